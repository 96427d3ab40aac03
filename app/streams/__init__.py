"""Video: streams from cameras and files, and clients' frames, through the batcher."""
