"""jsds-jax: joint sparse-dense text-image retrieval on frozen dual encoders, in JAX/Flax."""

import setuptools

setuptools.setup(
    name="jsds-jax",
    version="0.1.0",
    description=__doc__,
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["jsds_jax", "jsds_jax.*"]),
    install_requires=[
        "jax>=0.8",
        "flax>=0.11",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "ml-collections>=1.0",
        "transformers>=4.50",
        "tokenizers",
        "safetensors",
        "huggingface-hub",
        "numpy",
        "pillow",
        "tqdm",
        "absl-py",
        "numba",  # the exact inverted index's kernels
        "matplotlib",  # eval's pruning plot (Agg backend, no display needed)
        "tensorboardX",  # train's TensorBoard event files, without TensorFlow
    ],
    extras_require={
        # The tfds path needs TensorFlow to construct any builder; nothing else imports it.
        "tfds": ["tensorflow-datasets==4.9.10", "tensorflow-cpu==2.21.0", "importlib_resources"],
        # Parity tests run our Flax towers against the Hugging Face PyTorch models (CPU build).
        # The approximate index backend (jsds_jax/index/seismic_backend.py).
        "seismic": ["pyseismic-lsr"],
        # The offline corpus (jsds_jax/data/corpus.py) renders SVG pictures with resvg.
        "corpus": ["resvg-py==0.5.0"],
        "test": [
            "pytest",
            "pytest-xdist",
            "torch==2.13.0",
            "scikit-image",
            "pyyaml",  # timm's, which launch/install.sh installs with --no-deps
            "pyseismic-lsr",
            "resvg-py==0.5.0",  # tests/test_data_corpus.py renders its fixtures
        ],
    },
    entry_points={
        "console_scripts": [
            "jsds-encode=jsds_jax.encode:run",
            "jsds-run=jsds_jax.main:run",
            "jsds-train=jsds_jax.train:run",
            "jsds-eval=jsds_jax.eval:run",
            "jsds-search=jsds_jax.search:run",
        ],
    },
)
