"""Streaming inference: sources (camera, video, images, audio) → pre-processing → model →
post-processing → results. Configured from the bundle manifest and the agent config."""
