"""Packaging for megatron-vita (the library) and mindspeed_patches (its Ascend NPU adapter).

torch is a range, not a pin: the CPU path installs the local torch 2.13.0 wheel first
(tools/setup_cpu_env.sh) and then everything else under constraints-cpu.txt, so pip never
picks a CUDA build on its own. NPU clusters bring the torch their CANN/torch_npu needs.
"""
from setuptools import find_packages, setup

VERSION = "0.1.0"

CORE = [
    "torch>=2.6,<2.14",
    "megatron-core==0.12.1",
    # Verified on torch 2.13.0 CPU with 5.24.0: Qwen2 modules + InternVLVisionModel, rope_parameters.
    "transformers>=5.24,<6",
    "safetensors>=0.4",
    "pyyaml>=6.0",
    "numpy>=1.26",
    "pillow>=10.0",
    "tqdm>=4.66",
    # Loss curve and `data inspect` PNGs, drawn headless on the Agg canvas (verified with 3.11.2).
    "matplotlib>=3.7",
    # megatron.core.dist_checkpointing imports psutil without declaring it.
    "psutil>=5.9",
    "tokenizers>=0.21",
]

EXTRAS = {
    # decord is the reference decoder; PyAV is the fallback where decord has no wheel (aarch64).
    "video": ["decord>=0.6.0; platform_machine=='x86_64'", "av>=12"],
    # torch_npu must match the cluster's torch + CANN release. MindSpeed itself is NOT on PyPI
    # (the PyPI name is a placeholder): install it from source at the branch that targets
    # megatron-core 0.12.1, see README "NPU install".
    "npu": ["torch_npu"],
    # Optional fused kernels on Nvidia GPUs: flash-attn >= 2.1 backs the attention leaf under
    # --use-flash-attn (2.1 aligned causal masks bottom-right, what KV-cache decoding needs); it
    # builds against the installed CUDA torch (pip install --no-build-isolation). Never
    # `pip install apex` (an unrelated PyPI project): build NVIDIA/apex from source if wanted.
    "gpu": ["flash-attn>=2.1", "transformer-engine[pytorch]"],
    "train": ["tensorboard>=2.14"],
    # `megatron-vita serve`: an OpenAI-compatible server on Starlette/FastAPI under uvicorn.
    "serve": ["fastapi>=0.110", "uvicorn>=0.29"],
    # `megatron-vita eval`: Video-MME ships its annotations as parquet.
    "eval": ["pyarrow>=14"],
    # The server is tested with the official `openai` client over loopback.
    "test": ["pytest>=8", "pytest-timeout>=2.2", "av>=12", "tensorboard>=2.14",
             "fastapi>=0.110", "uvicorn>=0.29", "openai>=1.30", "pyarrow>=14"],
}

setup(
    name="megatron-vita",
    version=VERSION,
    description="Long-VITA (InternViT-300M + MLP projector + Qwen2.5) on megatron-core for Ascend NPU, "
    "Nvidia GPU and CPU: training, conversion, long-context inference",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_vita", "megatron_vita.*", "mindspeed_patches", "mindspeed_patches.*"]),
    package_data={"megatron_vita": ["py.typed"]},
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["megatron-vita=megatron_vita.cli:console_main"]},
    license="Apache-2.0",
)
