import fvtransform as fvt

EXPECTED_TOP = {
    "CheckReport", "Fuse", "KeyMap", "MappingPlan", "ParamTree", "REGISTRY", "Registry", "Rename", "RenameRules",
    "Transform", "__version__", "build", "call", "call_with_buffers", "cast", "chain", "check", "combine", "drop",
    "errors", "load", "load_model", "lora", "map_tensors", "partition", "register", "rename", "resolve", "save",
    "select", "tensors_equal", "to", "transforms", "update", "shard", "unshard", "distributed",
}
EXPECTED_LORA = {
    "FORMATS", "Delta", "ExtractReport", "FullDelta", "LoraAdapter", "LowRank", "MergeRecord", "ResolutionReport",
    "call", "call_factors", "combine", "compress", "factors", "pad_rank", "detect_format", "extract", "load", "merge", "merge_checkpoint", "merge_transform", "random_adapter",
    "restore", "save", "scale_adapter", "unmerge", "unmerge_transform",
}


def test_top_level_names_are_pinned():
    assert set(fvt.__all__) == EXPECTED_TOP
    for name in fvt.__all__:
        assert hasattr(fvt, name), name


def test_lora_names_are_pinned():
    assert set(fvt.lora.__all__) == EXPECTED_LORA


def test_design_contract_names_exist():
    import fvtransform.hub

    assert set(fvtransform.hub.__all__) == {"maybe_download_model", "maybe_download_lora", "resolved_commit"}
    for name in fvtransform.hub.__all__:
        assert callable(getattr(fvtransform.hub, name))
    assert callable(fvt.ParamTree.from_module)
    assert issubclass(fvt.errors.KeyMismatchError, fvt.errors.FvTransformError)


def test_every_error_class_derives_from_the_base():
    for name in fvt.errors.__all__:
        obj = getattr(fvt.errors, name)
        if isinstance(obj, type):
            assert issubclass(obj, fvt.errors.FvTransformError), name
