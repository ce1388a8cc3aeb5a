//! Helpers for parsing a policy's `config`.

/// Parses a duration written as the manifest writes them — `"250ms"`,
/// `"10s"`, `"5m"` or `"1h"`, a whole number and a unit — into milliseconds.
pub fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(split);
    let invalid = || {
        format!("{text:?} is not a duration (a whole number with ms, s, m or h, such as \"10s\")")
    };
    let amount: u64 = digits.parse().map_err(|_| invalid())?;
    let per_unit: u64 = match unit.trim() {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(invalid()),
    };
    amount
        .checked_mul(per_unit)
        .ok_or_else(|| format!("{text:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_every_unit() {
        assert_eq!(parse_duration_ms("250ms"), Ok(250));
        assert_eq!(parse_duration_ms(" 10s "), Ok(10_000));
        assert_eq!(parse_duration_ms("5m"), Ok(300_000));
        assert_eq!(parse_duration_ms("1h"), Ok(3_600_000));
        for bad in ["10", "s", "1.5s", "10 secs", "-1s", ""] {
            assert!(parse_duration_ms(bad).is_err(), "{bad:?}");
        }
        assert!(
            parse_duration_ms("99999999999999999h")
                .unwrap_err()
                .contains("too long")
        );
    }
}
