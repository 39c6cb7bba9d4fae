import jax
import jax.numpy as jnp
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
