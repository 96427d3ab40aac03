"""Video sources for the stream tests: a synthetic scene with known paths, files, RTSP, MJPEG."""
