//! Parsing of the contract's durations (`"5s"`, `"10m"`) and sizes (`"1MiB"`, `1048576`).

use std::time::Duration;

/// Parses a duration string such as `"500ms"`, `"5s"`, `"10m"`, `"1h"`, `"1h 30m"`.
/// A bare number is refused: the unit must be explicit.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() || t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("`{s}` is not a duration: write a number with a unit, e.g. \"5s\", \"10m\""));
    }
    humantime::parse_duration(t).map_err(|e| format!("`{s}` is not a duration ({e})"))
}

/// Parses a size: decimal digits with an optional unit. Binary units (`KiB`, `MiB`, `GiB`) are
/// powers of 1024, SI units (`KB`, `MB`, `GB`) powers of 1000, `B` or no unit bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let bad = || format!("`{s}` is not a size: write bytes or a number with a unit, e.g. \"256KiB\", \"10MiB\"");
    if digits.is_empty() {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "k" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "TiB" | "T" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(|| format!("`{s}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("five seconds").is_err());
        assert!(parse_duration("-5s").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("256KiB").unwrap(), 256 * 1024);
        assert_eq!(parse_size("4KiB").unwrap(), 4096);
        assert_eq!(parse_size("10MB").unwrap(), 10_000_000);
        assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
        assert_eq!(parse_size("10 MiB").unwrap(), 10 << 20);
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("-1KiB").is_err());
        assert!(parse_size("1.5MiB").is_err());
        assert!(parse_size("1XB").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("18446744073709551615GiB").is_err());
    }
}
