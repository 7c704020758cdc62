"""Using a trained model: face detection and framing (faces), the ONNX release (export,
release) and `ferpipe classify` (classify). Imports model, explanations and the base modules."""
