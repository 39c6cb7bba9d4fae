import flaxlazy

PUBLIC = [
    "CheckpointSource",
    "GPT2_HF",
    "LLAMA_HF",
    "Lazy",
    "Report",
    "SafetensorsSource",
    "TrainState",
    "abstract_init",
    "abstract_train_state",
    "clear_caches",
    "from_checkpoint",
    "from_safetensors",
    "init_train_state",
    "inspect",
    "lazy",
    "materialize",
    "nbytes",
    "num_params",
    "restore",
    "save",
    "shardings",
    "spec",
    "summary",
]


def test_public_names_exported_and_documented():
    assert sorted(flaxlazy.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        obj = getattr(flaxlazy, name)
        assert obj.__doc__ and len(obj.__doc__) > 40, name


def test_version():
    assert isinstance(flaxlazy.__version__, str) and flaxlazy.__version__.count(".") == 2
