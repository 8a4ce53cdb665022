"""longtrain: train language models on very long sequences across many GPUs."""
from setuptools import find_packages, setup

setup(
    name="longtrain",
    version="0.1.0",
    description="Long-sequence LLM training: sequence parallelism, ZeRO, StreamBP, MoE balancing.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["longtrain", "longtrain.*"]),
    python_requires=">=3.10",
    install_requires=[
        # A range, never a pin to a CUDA build: install the torch build for your machine first.
        "torch>=2.4",
        "deepspeed>=0.16",
        "hydra-core>=1.3,<1.4",
        "omegaconf>=2.3",
        "datasets>=2.19",
        "wandb>=0.17",
        "transformers>=4.45",
        "tokenizers>=0.19",
        "safetensors>=0.4",
        "tqdm>=4.66",
        "matplotlib>=3.7",
        "numpy>=1.24",
        "pyyaml>=6",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3", "import-linter>=2.0"],
        "megatron": ["megatron-core>=0.9"],
    },
    entry_points={"console_scripts": ["longtrain-train=longtrain.train:main", "longtrain-plan=longtrain.plan.cli:main",
                                      "longtrain-eval=longtrain.eval.cli:main"]},
)
