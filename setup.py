"""moe_dist: expert-parallel, routing-aware LoRA fine-tuning of Hugging Face MoE models on DeepSpeed."""

from setuptools import find_packages, setup

setup(
    name="moe_dist",
    version="0.1.0",
    description="Expert-parallel routing-aware LoRA fine-tuning of HF MoE models on DeepSpeed",
    packages=find_packages(include=["moe_dist", "moe_dist.*"]),
    # The CPU expert kernel's source (compiled on first use by torch.utils.cpp_extension) and the
    # published configs of the models the recipes name (offline planning).
    package_data={"moe_dist": ["kernels/csrc/*.cpp", "models/configs/*.json"]},
    python_requires=">=3.10",
    # torch is pinned at 2.13 but not to a build: a GPU box keeps its CUDA torch.
    install_requires=[
        "torch>=2.13,<2.14",
        "deepspeed==0.19.8",
        "transformers>=5.23,<5.24",
        "peft==0.21.2",
        "safetensors>=0.4",
        "datasets>=3.0",
        "tokenizers>=0.22",
        "tensorboard>=2.16",
        "pyyaml>=6.0",
    ],
    extras_require={
        "dev": ["pytest>=8.0", "mpi4py>=4.0"],
        "mpi": ["mpi4py>=4.0"],
    },
)
