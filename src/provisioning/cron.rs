//! Validation of the 5-field cron expressions a CronJob accepts (the robfig/cron dialect
//! Kubernetes uses): `*`, values, ranges, steps, lists, month and weekday names, `?` in the
//! day fields, and the `@hourly`-style macros. Validated here so a bad schedule is a 422 naming
//! the field, not a Kubernetes error halfway through a run.

const MACROS: &[&str] = &[
    "@yearly",
    "@annually",
    "@monthly",
    "@weekly",
    "@daily",
    "@midnight",
    "@hourly",
];
const MONTHS: &[&str] = &[
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const WEEKDAYS: &[&str] = &["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

struct Field {
    name: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
    /// The first name's numeric value (months count from 1, weekdays from 0).
    names_from: u32,
    allows_question_mark: bool,
}

const FIELDS: [Field; 5] = [
    Field {
        name: "minute",
        min: 0,
        max: 59,
        names: &[],
        names_from: 0,
        allows_question_mark: false,
    },
    Field {
        name: "hour",
        min: 0,
        max: 23,
        names: &[],
        names_from: 0,
        allows_question_mark: false,
    },
    Field {
        name: "day of month",
        min: 1,
        max: 31,
        names: &[],
        names_from: 0,
        allows_question_mark: true,
    },
    Field {
        name: "month",
        min: 1,
        max: 12,
        names: MONTHS,
        names_from: 1,
        allows_question_mark: false,
    },
    Field {
        name: "day of week",
        min: 0,
        max: 7,
        names: WEEKDAYS,
        names_from: 0,
        allows_question_mark: true,
    },
];

/// `Ok(())` for a schedule Kubernetes will accept, else a message saying what is wrong.
pub fn validate(expression: &str) -> Result<(), String> {
    let expression = expression.trim();
    if expression.len() > 200 {
        return Err("is too long".into());
    }
    if expression.starts_with('@') {
        return if MACROS.contains(&expression.to_ascii_lowercase().as_str()) {
            Ok(())
        } else {
            Err(format!("unknown macro {expression:?}"))
        };
    }
    let parts: Vec<&str> = expression.split_whitespace().collect();
    if parts.len() != 5 {
        return Err(format!(
            "must have 5 fields (minute hour day-of-month month day-of-week), found {}",
            parts.len()
        ));
    }
    for (part, field) in parts.iter().zip(FIELDS.iter()) {
        validate_field(part, field).map_err(|e| format!("{} field {part:?}: {e}", field.name))?;
    }
    Ok(())
}

fn validate_field(text: &str, field: &Field) -> Result<(), String> {
    for item in text.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((range, step)) => (range, Some(step)),
            None => (item, None),
        };
        if let Some(step) = step {
            let step: u32 = step.parse().map_err(|_| format!("step {step:?} is not a number"))?;
            if step == 0 || step > field.max {
                return Err(format!("step must be between 1 and {}", field.max));
            }
        }
        match range {
            "*" => {}
            "?" if field.allows_question_mark => {}
            _ => match range.split_once('-') {
                Some((low, high)) => {
                    let (low, high) = (value(low, field)?, value(high, field)?);
                    if low > high {
                        return Err(format!("range {range:?} runs backwards"));
                    }
                }
                None => {
                    value(range, field)?;
                }
            },
        }
    }
    Ok(())
}

fn value(text: &str, field: &Field) -> Result<u32, String> {
    if let Some(index) = field.names.iter().position(|n| n.eq_ignore_ascii_case(text)) {
        return Ok(index as u32 + field.names_from);
    }
    let number: u32 = text.parse().map_err(|_| format!("{text:?} is not a value"))?;
    if number < field.min || number > field.max {
        return Err(format!("{number} is outside {}-{}", field.min, field.max));
    }
    Ok(number)
}

#[cfg(test)]
mod tests {
    use super::validate;
    use proptest::prelude::*;

    #[test]
    fn accepts_what_kubernetes_accepts() {
        for ok in [
            "0 2 * * *",
            "*/15 * * * *",
            "0 */2 * * *",
            "0 9-17 * * MON-FRI",
            "5,35 0 1 jan,jul ?",
            "@hourly",
            "0 0 * * 7",
        ] {
            assert_eq!(validate(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn rejects_what_kubernetes_rejects() {
        for bad in [
            "",
            "* * * *",
            "* * * * * *",
            "60 * * * *",
            "* 24 * * *",
            "* * 0 * *",
            "* * * 13 *",
            "*/0 * * * *",
            "5-1 * * * *",
            "@often",
            "a b c d e",
            "* * * * 8",
            "1,,2 * * * *",
        ] {
            assert!(validate(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,64}") {
            let _ = validate(&s);
        }

        #[test]
        fn generated_valid_schedules_pass(m in 0u32..60, h in 0u32..24, step in 1u32..60) {
            let expression = format!("{m} {h} * * *");
            prop_assert!(validate(&expression).is_ok());
            let stepped = format!("*/{step} * * * *");
            prop_assert!(validate(&stepped).is_ok());
        }
    }
}
