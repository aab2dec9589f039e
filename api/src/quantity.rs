//! Kubernetes resource quantities (`2Gi`, `500Mi`, `1G`, `1.5e9`) as byte counts.

use std::fmt;
use std::str::FromStr;

/// A parsed quantity, kept with its original spelling so it can be echoed back unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quantity {
    text: String,
    bytes: u64,
}

/// Why a quantity string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    /// Empty input.
    #[error("quantity is empty")]
    Empty,
    /// Not `<number><suffix>`.
    #[error("quantity {0:?} is not a valid kubernetes quantity (e.g. 2Gi, 500Mi, 1G)")]
    Syntax(String),
    /// Negative sizes make no sense for storage.
    #[error("quantity {0:?} is negative")]
    Negative(String),
    /// Larger than u64 bytes.
    #[error("quantity {0:?} is too large")]
    Overflow(String),
}

impl Quantity {
    /// Parse a Kubernetes quantity; fractional byte counts round up, as Kubernetes does for
    /// storage requests.
    pub fn parse(text: &str) -> Result<Self, QuantityError> {
        let bytes = parse_bytes(text)?;
        Ok(Quantity {
            text: text.trim().to_string(),
            bytes,
        })
    }

    /// A quantity of exactly `bytes`, spelled as a plain integer.
    pub fn from_bytes(bytes: u64) -> Self {
        Quantity {
            text: bytes.to_string(),
            bytes,
        }
    }

    /// The value in bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The original spelling.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for Quantity {
    type Err = QuantityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Quantity::parse(s)
    }
}

impl serde::Serialize for Quantity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> serde::Deserialize<'de> for Quantity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Kubernetes accepts both `"10Gi"` and a bare number in YAML/JSON.
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            S(String),
            U(u64),
            F(f64),
        }
        let text = match Raw::deserialize(d)? {
            Raw::S(s) => s,
            Raw::U(u) => u.to_string(),
            Raw::F(f) => f.to_string(),
        };
        Quantity::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Parse to bytes, rounding fractional results up.
pub fn parse_bytes(input: &str) -> Result<u64, QuantityError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(QuantityError::Empty);
    }
    let syntax = || QuantityError::Syntax(input.to_string());
    let (sign, body) = match s.as_bytes()[0] {
        b'-' => (-1, &s[1..]),
        b'+' => (1, &s[1..]),
        _ => (1, s),
    };
    let num_end = body
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(body.len());
    let (number, suffix) = body.split_at(num_end);
    if number.is_empty() || number == "." || number.matches('.').count() > 1 {
        return Err(syntax());
    }
    // Value = mantissa * 10^exp10 * 2^exp2, kept exact as integers and rounded up at the end.
    let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
    let digits = format!("{int_part}{frac_part}");
    let mantissa: u128 = digits.trim_start_matches('0').parse().unwrap_or(0);
    if digits.len() > 30 {
        return Err(QuantityError::Overflow(input.to_string()));
    }
    let mut exp10: i64 = -(frac_part.len() as i64);
    let mut exp2: u32 = 0;
    match suffix {
        "" => {}
        "Ki" => exp2 = 10,
        "Mi" => exp2 = 20,
        "Gi" => exp2 = 30,
        "Ti" => exp2 = 40,
        "Pi" => exp2 = 50,
        "Ei" => exp2 = 60,
        "m" => exp10 -= 3,
        "k" => exp10 += 3,
        "M" => exp10 += 6,
        "G" => exp10 += 9,
        "T" => exp10 += 12,
        "P" => exp10 += 15,
        "E" => exp10 += 18,
        other => {
            let exp = other.strip_prefix(['e', 'E']).ok_or_else(syntax)?;
            let e: i64 = exp.parse().map_err(|_| syntax())?;
            exp10 += e;
        }
    }
    if sign < 0 && mantissa != 0 {
        return Err(QuantityError::Negative(input.to_string()));
    }
    let overflow = || QuantityError::Overflow(input.to_string());
    let mut value = mantissa.checked_mul(1u128 << exp2).ok_or_else(overflow)?;
    if exp10 >= 0 {
        let scale = 10u128.checked_pow(u32::try_from(exp10).map_err(|_| overflow())?);
        value = value
            .checked_mul(scale.ok_or_else(overflow)?)
            .ok_or_else(overflow)?;
    } else {
        let scale = 10u128.checked_pow(u32::try_from(-exp10).map_err(|_| overflow())?);
        match scale {
            Some(scale) => value = value.div_ceil(scale),
            // Dividing by more than 10^38 leaves at most 1 (rounded up) for any mantissa.
            None => value = u128::from(value > 0),
        }
    }
    u64::try_from(value).map_err(|_| overflow())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_suffixes() {
        assert_eq!(parse_bytes("2Gi").unwrap(), 2 << 30);
        assert_eq!(parse_bytes("500Mi").unwrap(), 500 << 20);
        assert_eq!(parse_bytes("1Ki").unwrap(), 1024);
    }

    #[test]
    fn decimal_suffixes() {
        assert_eq!(parse_bytes("1G").unwrap(), 1_000_000_000);
        assert_eq!(parse_bytes("1.5G").unwrap(), 1_500_000_000);
        assert_eq!(parse_bytes("10k").unwrap(), 10_000);
    }

    #[test]
    fn exponent_and_plain() {
        assert_eq!(parse_bytes("1e9").unwrap(), 1_000_000_000);
        assert_eq!(parse_bytes("1048576").unwrap(), 1_048_576);
    }

    #[test]
    fn milli_rounds_up() {
        assert_eq!(parse_bytes("1500m").unwrap(), 2);
    }

    #[test]
    fn fraction_of_binary_rounds_up() {
        assert_eq!(parse_bytes("0.5Ki").unwrap(), 512);
        assert_eq!(parse_bytes("1.1Ki").unwrap(), 1127);
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(parse_bytes("2GB"), Err(QuantityError::Syntax(_))));
        assert!(matches!(parse_bytes("abc"), Err(QuantityError::Syntax(_))));
        assert!(matches!(parse_bytes(""), Err(QuantityError::Empty)));
        assert!(matches!(
            parse_bytes("-1Gi"),
            Err(QuantityError::Negative(_))
        ));
        assert!(matches!(
            parse_bytes("99999Ei"),
            Err(QuantityError::Overflow(_))
        ));
    }

    #[test]
    fn serde_accepts_string_and_number() {
        let q: Quantity = serde_json::from_str("\"10Gi\"").unwrap();
        assert_eq!(q.bytes(), 10 << 30);
        let n: Quantity = serde_json::from_str("4096").unwrap();
        assert_eq!(n.bytes(), 4096);
        assert_eq!(serde_json::to_string(&q).unwrap(), "\"10Gi\"");
    }
}
