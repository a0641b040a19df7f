//! Figures over rounds: medians with ranges, ratios, and the markdown tables they go into.

use std::collections::BTreeMap;

/// Every value of every metric of every target, in the order measured.
#[derive(Default)]
pub struct Samples {
    values: BTreeMap<(String, String), Vec<f64>>,
}

impl Samples {
    /// Adds one round's value of `metric` for `target`.
    pub fn push(&mut self, target: &str, metric: &str, value: f64) {
        let key = (target.to_owned(), metric.to_owned());
        self.values.entry(key).or_default().push(value);
    }

    /// All values recorded for `target` and `metric`.
    pub fn get(&self, target: &str, metric: &str) -> &[f64] {
        (self.values.get(&(target.to_owned(), metric.to_owned()))).map_or(&[], Vec::as_slice)
    }

    /// The median of `target`'s `metric`, if measured.
    pub fn median(&self, target: &str, metric: &str) -> Option<f64> {
        median(self.get(target, metric))
    }

    /// "median (min–max)" of `target`'s `metric`, or "–" when not measured.
    pub fn cell(&self, target: &str, metric: &str, digits: usize) -> String {
        let values = self.get(target, metric);
        let Some(mid) = median(values) else {
            return "–".to_owned();
        };
        let (lo, hi) = range(values);
        if values.len() == 1 {
            return fmt(mid, digits);
        }
        format!(
            "{} ({}–{})",
            fmt(mid, digits),
            fmt(lo, digits),
            fmt(hi, digits)
        )
    }
}

/// Median of `values` (mean of the middle two for an even count).
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    Some(if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    })
}

/// Smallest and largest of `values`.
pub fn range(values: &[f64]) -> (f64, f64) {
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo, hi)
}

/// A number with `digits` decimals and thousands separators for large values.
pub fn fmt(value: f64, digits: usize) -> String {
    if !value.is_finite() {
        return "–".to_owned();
    }
    if digits == 0 && value.abs() >= 10_000.0 {
        let text = format!("{value:.0}");
        let (sign, digits_only) = text
            .strip_prefix('-')
            .map_or(("", text.as_str()), |t| ("-", t));
        let mut out = String::new();
        for (i, c) in digits_only.chars().enumerate() {
            if i > 0 && (digits_only.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        return format!("{sign}{out}");
    }
    format!("{value:.digits$}")
}

/// `a / b` as "1.23×", or "–".
pub fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "–".to_owned(),
    }
}

/// A markdown table.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut out = format!("| {} |\n", header.join(" | "));
    out += &format!("|{}\n", header.iter().map(|_| "---|").collect::<String>());
    for row in rows {
        out += &format!("| {} |\n", row.join(" | "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn cell_shows_median_and_range() {
        let mut s = Samples::default();
        for v in [10.0, 30.0, 20.0] {
            s.push("edge", "rate", v);
        }
        assert_eq!(s.cell("edge", "rate", 1), "20.0 (10.0–30.0)");
        assert_eq!(s.cell("nginx", "rate", 1), "–");
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(fmt(1_234_567.0, 0), "1,234,567");
        assert_eq!(fmt(999.4, 0), "999");
        assert_eq!(ratio(Some(3.0), Some(2.0)), "1.50×");
    }
}
