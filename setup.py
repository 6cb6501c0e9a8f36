"""qtrain package metadata. `pip install -e .[dev]` for development."""

from setuptools import find_packages, setup

setup(
    name="qtrain",
    version="0.1.0",
    description="Fine-tune LLMs with LoRA on a 4-bit NF4 base: one GPU, a node, or a SLURM cluster.",
    python_requires=">=3.10",
    packages=find_packages(include=["qtrain", "qtrain.*"]) + ["qtrain_kernels", "qtrain_kernels.triton"],
    package_dir={"qtrain_kernels": "kernels/qtrain_kernels", "qtrain_kernels.triton": "kernels/qtrain_kernels/triton"},
    package_data={"qtrain_kernels": ["host_cache.cpp", "nf4_cpu.cpp"]},  # compiled on first use (qtrain_kernels/native.py)
    install_requires=[
        # CPU-only machines: `pip install torch==2.13.0` first (a bare `torch` pulls CUDA wheels).
        "torch>=2.4",
        "transformers>=5.0",  # the loader ties weights through the v5 tie_weights(missing_keys=...) API
        "accelerate>=1.0",
        "bitsandbytes>=0.46",
        "datasets>=3.0",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "numpy>=1.24",
        "xxhash>=3.0",  # the data cache's content digests
        "rouge-score>=0.1.2",  # `qtrain eval`: ROUGE-1/2/L/Lsum
        "matplotlib>=3.7",  # `qtrain compare`: loss-curve and ROUGE plots
    ],
    extras_require={
        "dev": ["pytest>=8", "hypothesis>=6.100", "tensorboard>=2.10", "peft>=0.15", "triton>=3.0", "deepspeed>=0.16"],
        "gpu": ["triton>=3.0", "deepspeed>=0.16"],
    },
    entry_points={"console_scripts": ["qtrain=qtrain.cli:main"]},
)
