//! The `quant_state.bitsandbytes__<type>` tensor, byte for byte as bitsandbytes writes it.
//!
//! bitsandbytes (`functional.py`, `QuantState.as_dict(packed=True)` and `pack_dict_to_tensor`) stores
//! `json.dumps(d).encode("utf-8")` of the non-tensor fields, in insertion order: `quant_type`,
//! `blocksize`, `dtype`, `shape`, then, with double quantization, `nested_blocksize`, `nested_dtype`,
//! `nested_offset`. `json.dumps` separates with `", "` and `": "`, and writes a float with Python's
//! `repr` (`nested_offset` is `offset.item()`: the f32 offset widened to a Python float).

use crate::dtype::Dtype;
use crate::quant::{QuantType, NESTED_BLOCKSIZE};

/// Longest `repr` of a float widened from f32 (`-d.dddddddddddddddde-XX` is 23 bytes).
pub const MAX_FLOAT_REPR: usize = 24;

/// Python's `repr(x)` of a float (`float_repr_style == "short"`): the shortest digits that round-trip,
/// in positional notation when the decimal exponent is in [-4, 16), else `d.ddde±XX`. `json.dumps`
/// writes NaN and infinities as `NaN`, `Infinity`, `-Infinity`.
pub fn py_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    let s = shortest_digits(x);
    let (mantissa, exp) = s.split_once('e').expect("LowerExp always has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    // Python's `decpt`: the value is 0.DIGITS x 10^decpt (Python/pystrtod.c, format_float_short).
    let decpt = exp + 1;
    let body = if !(-4 < decpt && decpt <= 16) {
        let mut b = digits[..1].to_string();
        if digits.len() > 1 {
            b.push('.');
            b.push_str(&digits[1..]);
        }
        let e = decpt - 1;
        b.push_str(&format!("e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs()));
        b
    } else if decpt <= 0 {
        format!("0.{}{}", "0".repeat((-decpt) as usize), digits)
    } else if decpt as usize >= digits.len() {
        format!("{}{}.0", digits, "0".repeat(decpt as usize - digits.len()))
    } else {
        let (int, frac) = digits.split_at(decpt as usize);
        format!("{int}.{frac}")
    };
    format!("{sign}{body}")
}

/// `d.ddde±X` with the fewest digits that read back as `x`, the digits rounded half to even when two
/// such strings are equally near. Rust's `{:e}` finds the length but breaks those ties upwards;
/// Python's dtoa (mode 0) breaks them to the even digit, and a float widened from f32 has a short
/// exact expansion, so ties are common (0.073673248291015625 is printed 0.07367324829101562).
fn shortest_digits(x: f64) -> String {
    let shortest = format!("{x:e}");
    let digits = shortest
        .split_once('e')
        .map_or(0, |(m, _)| m.chars().filter(char::is_ascii_digit).count());
    let even = format!("{:.*e}", digits.saturating_sub(1), x);
    if even.parse::<f64>() == Ok(x) {
        even
    } else {
        shortest
    }
}

/// The torch dtype name bitsandbytes writes (`str(dtype).strip("torch.")`).
pub fn torch_dtype_name(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F32 => "float32",
        Dtype::F16 => "float16",
        Dtype::BF16 => "bfloat16",
        Dtype::F64 => "float64",
        Dtype::U8 => "uint8",
        Dtype::I8 => "int8",
        Dtype::I16 => "int16",
        Dtype::I32 => "int32",
        Dtype::I64 => "int64",
        Dtype::U16 => "uint16",
        Dtype::U32 => "uint32",
        Dtype::U64 => "uint64",
        Dtype::Bool => "bool",
        Dtype::F8E4M3 => "float8_e4m3fn",
        Dtype::F8E5M2 => "float8_e5m2",
    }
}

/// The JSON bytes of a 4-bit weight's `quant_state.bitsandbytes__<type>` tensor.
///
/// `shape` is the quantized weight's shape (`[out, in]`), `dtype` the dtype it was quantized from and
/// dequantizes back to, `nested_offset` the double quantization's offset (None without it).
pub fn quant_state_json(
    quant_type: QuantType,
    blocksize: usize,
    dtype: Dtype,
    shape: &[usize],
    nested_offset: Option<f32>,
) -> String {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let mut s = format!(
        "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}]",
        quant_type.as_str(),
        blocksize,
        torch_dtype_name(dtype),
        dims.join(", ")
    );
    if let Some(offset) = nested_offset {
        s.push_str(&format!(
            ", \"nested_blocksize\": {}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
            NESTED_BLOCKSIZE,
            py_float_repr(offset as f64)
        ));
    }
    s.push('}');
    s
}

/// The longest `quant_state_json` can be for these fields (the offset is not known before quantizing).
pub fn quant_state_json_bound(
    quant_type: QuantType,
    blocksize: usize,
    dtype: Dtype,
    shape: &[usize],
    nested: bool,
) -> usize {
    if !nested {
        return quant_state_json(quant_type, blocksize, dtype, shape, None).len();
    }
    // "0.0" is 3 bytes; the longest offset repr is MAX_FLOAT_REPR.
    quant_state_json(quant_type, blocksize, dtype, shape, Some(0.0)).len() - 3 + MAX_FLOAT_REPR
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_repr_matches_python() {
        // (value, Python's repr) pairs, from CPython 3.11.
        let cases: &[(f64, &str)] = &[
            (0.073_673_25_f32 as f64, "0.07367324829101562"),
            (0.5, "0.5"),
            (1.0, "1.0"),
            (-2.5, "-2.5"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (0.000012345, "1.2345e-05"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (123.456, "123.456"),
            (1.5e-300, "1.5e-300"),
            (0.1f32 as f64, "0.10000000149011612"),
            (f32::MIN_POSITIVE as f64, "1.1754943508222875e-38"),
            (1.401298464324817e-45, "1.401298464324817e-45"),
            (-0.0, "-0.0"),
            (0.0, "0.0"),
            (f64::NAN, "NaN"),
            (f64::INFINITY, "Infinity"),
        ];
        for &(x, want) in cases {
            assert_eq!(py_float_repr(x), want, "{x:e}");
        }
    }

    #[test]
    fn quant_state_json_matches_bitsandbytes() {
        // bytes saved by transformers 5.24 + bitsandbytes 0.50.2 for a [128, 384] bf16 weight
        let plain = quant_state_json(QuantType::Nf4, 64, Dtype::BF16, &[128, 384], None);
        assert_eq!(
            plain,
            r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [128, 384]}"#
        );
        let nested = quant_state_json(
            QuantType::Nf4,
            64,
            Dtype::BF16,
            &[128, 384],
            Some(0.073_673_25),
        );
        assert_eq!(
            nested,
            r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [128, 384], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.07367324829101562}"#
        );
        let bound = quant_state_json_bound(QuantType::Nf4, 64, Dtype::BF16, &[128, 384], true);
        assert!(bound >= nested.len());
        for x in [-1.2345678e-30f32, 3.4028235e38, -1.1754942e-38, 1e-45] {
            let s = quant_state_json(QuantType::Fp4, 4096, Dtype::F16, &[7, 9], Some(x));
            let b = quant_state_json_bound(QuantType::Fp4, 4096, Dtype::F16, &[7, 9], true);
            assert!(s.len() <= b, "{s}");
        }
    }
}
