from setuptools import setup

setup(
    name="sdrt",
    version="0.1.0",
    description="Stable Diffusion inference runtime: reference modules, fused Triton kernels, ONNX/TensorRT export, CUDA graphs",
    python_requires=">=3.10",
    packages=["sdrt", "sdrt.cli", "sdrt.models", "sdrt.backends", "sdrt.tiny", "sdrt.kernels", "sdrt.export", "sdrt.bench",
              "sdrt.serve", "sdrt.lora"],
    package_dir={"sdrt.kernels": "kernels", "sdrt.export": "export", "sdrt.bench": "bench"},
    package_data={"sdrt": ["assets/tiny-sd/*.json", "assets/tiny-sd/*/*.json", "assets/tiny-sd/*/*.txt",
                           "assets/tiny-sd/*/*.safetensors", "assets/*.png",
                           "assets/clip_bpe_merges.txt.gz", "assets/clip_bpe_merges.LICENSE.txt"]},
    install_requires=["torch>=2.4", "numpy", "safetensors", "tokenizers", "pillow", "tqdm"],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "diffusers", "transformers", "accelerate", "matplotlib"],
        "triton": ["triton"],
        "onnx": ["onnx", "onnxruntime", "onnxscript"],
        "openvino": ["onnx", "openvino"],
        "gpu": ["onnxruntime-gpu", "tensorrt"],
        "control": ["opencv-python-headless"],  # ControlNet preprocessors (canny)
        "serve": ["fastapi", "uvicorn", "prometheus_client"],
        "ray": ["ray[serve]", "fastapi", "uvicorn", "prometheus_client"],
        # everything the test suite exercises on a CPU-only machine
        "test": ["pytest", "pytest-benchmark", "diffusers", "transformers", "accelerate", "matplotlib",
                 "triton", "onnx", "onnxruntime", "onnxscript", "openvino",
                 "fastapi", "uvicorn", "prometheus_client", "httpx", "webuiapi", "openai", "peft",
                 "ray[serve]", "pyyaml", "opencv-python-headless"],
    },
    entry_points={"console_scripts": ["sdrt=sdrt.cli:main"]},
)
