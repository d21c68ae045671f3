"""halo_jax: HALO post-training of video diffusion models (patch rewards + Gran-DPO) in JAX/Flax."""

from setuptools import find_packages, setup

RUNTIME = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "grain>=0.2.18",
    "array-record>=0.8",
    "tensorflow-datasets>=4.9.10",
    "transformers>=5,<6",
    "diffusers>=0.42,<0.43",
    "sentencepiece",
    "openai>=1.40",
    "absl-py",
    "ml_collections>=1.1",
    "safetensors",
    "ml_dtypes",
    "einops",
    "numpy>=2",
    "imageio",
    "imageio-ffmpeg",
    "tensorboardX",
    "tqdm",
    "pillow",
]

setup(
    name="halo_jax",
    version="0.1.0",
    description=__doc__,
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["halo_jax", "halo_jax.*"]),
    package_data={"halo_jax": ["**/*.json", "**/*.txt", "**/*.model", "**/*.safetensors"]},
    python_requires=">=3.11",
    install_requires=RUNTIME,
    extras_require={
        # torch 2.13.0 is the CPU build the parity tests compare against.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis", "torch==2.13.0", "accelerate"],
        "cuda": ["jax[cuda12]>=0.10.2"],
        "tpu": ["jax[tpu]>=0.10.2"],
    },
)
