"""Post-processors, one module per family; ``agent.pipelines.postprocess`` is the public entry point.

Each processor declares its options as a pydantic model (``agent.pipelines.options``); ``simple``
holds the classification and raw outputs; ``detection`` SSD/YOLO decoding, NMS and mapping boxes
back to the source image; ``events`` the stateful audio event detectors (VAD, wake word).
"""
