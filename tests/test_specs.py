import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxlazy


@pytest.mark.parametrize(
    "text, shape, dtype",
    [
        ("f32[8,512]", (8, 512), jnp.float32),
        ("i32[8,512]", (8, 512), jnp.int32),
        ("bf16[2,224,224,3]", (2, 224, 224, 3), jnp.bfloat16),
        ("f32[]", (), jnp.float32),
        ("u8[ 3 , 4 ]", (3, 4), jnp.uint8),
        ("bool[2]", (2,), jnp.bool_),
        ("f16[1]", (1,), jnp.float16),
        ("i8[1]", (1,), jnp.int8),
        ("i16[1]", (1,), jnp.int16),
        ("u32[1]", (1,), jnp.uint32),
        ("c64[2]", (2,), jnp.complex64),
        # The full names flaxlazy prints in its own messages (np.dtype(...).name).
        ("float32[2,3]", (2, 3), jnp.float32),
        ("bfloat16[4]", (4,), jnp.bfloat16),
        ("int32[8,128]", (8, 128), jnp.int32),
        ("bool[]", (), jnp.bool_),
        ("uint8[3]", (3,), jnp.uint8),
        ("float16[1]", (1,), jnp.float16),
        ("float8_e4m3fn[2]", (2,), jnp.float8_e4m3fn),
    ],
)
def test_string_specs(text, shape, dtype):
    s = flaxlazy.spec(text)
    assert isinstance(s, jax.ShapeDtypeStruct)
    assert s.shape == shape
    assert s.dtype == jnp.dtype(dtype)


def test_tuple_spec_defaults_to_float32():
    assert flaxlazy.spec((2, 3)) == jax.ShapeDtypeStruct((2, 3), jnp.float32)
    assert flaxlazy.spec((2, 3), jnp.int32).dtype == jnp.int32


@pytest.mark.parametrize(
    "shape, dtype, want",
    [
        ((np.int64(2), np.int32(3)), None, jax.ShapeDtypeStruct((2, 3), jnp.float32)),
        ([4], "bf16", jax.ShapeDtypeStruct((4,), jnp.bfloat16)),
        (np.int64(5), "i8", jax.ShapeDtypeStruct((5,), jnp.int8)),  # i8 is int8, as in 'i8[5]'
        ((2,), "float32", jax.ShapeDtypeStruct((2,), jnp.float32)),
        ((2,), np.dtype("int16"), jax.ShapeDtypeStruct((2,), jnp.int16)),
        ((), jax.random.key(0).dtype, jax.ShapeDtypeStruct((), jax.random.key(0).dtype)),
    ],
)
def test_numpy_ints_and_dtype_names(shape, dtype, want):
    assert flaxlazy.spec(shape, dtype) == want


def test_spec_string_round_trips_what_flaxlazy_prints():
    from flaxlazy._src import sharding_checks

    for dtype in (jnp.float32, jnp.bfloat16, jnp.int32, jnp.uint8, jnp.bool_):
        text = sharding_checks.shape_dtype((2, 3), dtype)  # how flaxlazy's messages print a leaf
        assert flaxlazy.spec(text) == jax.ShapeDtypeStruct((2, 3), dtype), text


@pytest.mark.parametrize(
    "bad, match",
    [
        ("f32(8,512)", r"Malformed spec 'f32\(8,512\)'.*expected the form DTYPE\[DIM"),
        ("float[8]", r"Unknown dtype prefix 'float'.*f32"),
        ("f32[8,,2]", r"Empty dimension.*DTYPE\[DIM"),
        ("f32[8,x]", r"Malformed spec"),
        ("", r"Malformed spec"),
    ],
)
def test_malformed_specs_show_expected_form(bad, match):
    with pytest.raises(ValueError, match=match):
        flaxlazy.spec(bad)


def test_string_spec_with_dtype_is_ambiguous():
    with pytest.raises(ValueError, match="carries its own dtype"):
        flaxlazy.spec("f32[2]", jnp.int32)


def test_negative_dimension():
    with pytest.raises(ValueError, match="negative dimension"):
        flaxlazy.spec((2, -1))
