"""Export of the reference modules: ONNX (`onnx`), TensorRT engines (`tensorrt`, `engine_cache`)."""
