"""Personal data in requests: detectors, the body scan, and the action a key takes."""
