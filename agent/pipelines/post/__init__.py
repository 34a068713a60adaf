"""Post-processors, one module per family; ``agent.pipelines.postprocess`` is the public entry point.

``options`` holds the manifest-option reader shared with pre-processing; ``simple`` the
classification and raw outputs; ``detection`` SSD/YOLO decoding, NMS and mapping boxes
back to the source image; ``events`` the stateful audio event detectors (VAD, wake word).
"""
