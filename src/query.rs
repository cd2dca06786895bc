//! Queries over one collection's records: conditions on top-level scalar fields (equality,
//! ranges, `in`, `exists`), all of which must hold, an order by one field, and pages. Pure: how
//! a condition reads a record's fields, how values compare, how a page's position is written;
//! the store decides how the records are found (a scan of the collection, or an index).
//!
//! Owns: the query's shape (as the socket's JSON and the CLI's `--where` give it), its checks,
//! matching, ordering and the `next` position of ordered pages. Must not touch: storage,
//! documents, encryption (the caller refuses conditions on encrypted fields).
//!
//! Values compare within their kind only: numbers with numbers (as numbers: `1` equals `1.0`),
//! strings with strings (by bytes), booleans with booleans, null with null. A condition whose
//! value is of another kind than the field's, or on a field holding an object or a list, does
//! not hold (`exists` aside). Ordered by a field, records go by kind first (missing, null,
//! booleans, numbers, strings, then objects and lists), then by value, then by id.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::record::Fields;

/// The most conditions one query may hold.
pub const MAX_CONDITIONS: usize = 32;
/// The most values one `in` may list.
pub const MAX_IN_VALUES: usize = 1000;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QueryError {
    #[error("a query holds at most {MAX_CONDITIONS} conditions; this one holds {0}")]
    TooManyConditions(usize),
    #[error("condition on {field:?}: {problem}")]
    Condition { field: String, problem: String },
    #[error("the `after` of an ordered query is the `next` its previous page gave: {0}")]
    BadPosition(String),
    #[error(
        "{0:?} cannot be read as a condition: write FIELD=VALUE, FIELD>VALUE, FIELD>=VALUE, FIELD<VALUE, FIELD<=VALUE, 'FIELD in V1,V2' or 'FIELD exists' / 'FIELD missing'"
    )]
    Unparsed(String),
}

/// How a condition tests its field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    #[serde(rename = "=")]
    Eq,
    #[serde(rename = "<")]
    Lt,
    #[serde(rename = "<=")]
    Le,
    #[serde(rename = ">")]
    Gt,
    #[serde(rename = ">=")]
    Ge,
    /// The field equals one of the values (`value` is their list).
    #[serde(rename = "in")]
    In,
    /// The field is present (`value`: absent or `true`) or absent (`false`).
    #[serde(rename = "exists")]
    Exists,
}

/// One condition: `{"field": "year", "op": ">=", "value": 2024}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    pub field: String,
    pub op: Op,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
}

/// Which way an ordered query goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    #[default]
    Asc,
    Desc,
}

/// A query, checked: what `Query::new` accepts.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    conditions: Vec<Condition>,
    order_by: Option<(String, Direction)>,
}

impl Query {
    /// Checks each condition: a top-level field name, a scalar value for comparisons, a list of
    /// scalars for `in`, a boolean (or nothing) for `exists`.
    pub fn new(
        conditions: Vec<Condition>,
        order_by: Option<(String, Direction)>,
    ) -> Result<Query, QueryError> {
        if conditions.len() > MAX_CONDITIONS {
            return Err(QueryError::TooManyConditions(conditions.len()));
        }
        for c in &conditions {
            let problem = |problem: &str| QueryError::Condition {
                field: c.field.clone(),
                problem: problem.to_owned(),
            };
            if c.field.is_empty() {
                return Err(problem("a field name is needed"));
            }
            match (c.op, &c.value) {
                (Op::Exists, None | Some(Value::Bool(_))) => {}
                (Op::Exists, Some(_)) => {
                    return Err(problem("`exists` takes true, false or no value"));
                }
                (Op::In, Some(Value::Array(values))) => {
                    if values.len() > MAX_IN_VALUES {
                        return Err(problem(&format!(
                            "`in` lists at most {MAX_IN_VALUES} values"
                        )));
                    }
                    if !values.iter().all(is_scalar) {
                        return Err(problem("`in` lists scalar values only"));
                    }
                }
                (Op::In, _) => return Err(problem("`in` takes a list of values")),
                (_, Some(value)) if is_scalar(value) => {}
                (_, Some(_)) => {
                    return Err(problem(
                        "only scalar values (strings, numbers, booleans, null) are compared",
                    ));
                }
                (_, None) => return Err(problem("a value to compare with is needed")),
            }
        }
        if let Some((field, _)) = &order_by
            && field.is_empty()
        {
            return Err(QueryError::Condition {
                field: String::new(),
                problem: "order_by needs a field name".into(),
            });
        }
        Ok(Query {
            conditions,
            order_by,
        })
    }

    pub fn conditions(&self) -> &[Condition] {
        &self.conditions
    }

    pub fn order_by(&self) -> Option<(&str, Direction)> {
        self.order_by.as_ref().map(|(f, d)| (f.as_str(), *d))
    }

    /// Every field the query reads (its conditions' and its order's).
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.conditions
            .iter()
            .map(|c| c.field.as_str())
            .chain(self.order_by.iter().map(|(f, _)| f.as_str()))
    }

    /// Whether every condition holds for a record with these fields.
    pub fn matches(&self, fields: &Fields) -> bool {
        self.conditions
            .iter()
            .all(|c| holds(c, fields.get(&c.field)))
    }

    /// Orders two records (fields and id) as the query's order says; by id without one.
    pub fn compare(&self, a: (&Fields, &str), b: (&Fields, &str)) -> Ordering {
        let Some((field, direction)) = &self.order_by else {
            return a.1.cmp(b.1);
        };
        let by_value = collate(a.0.get(field), b.0.get(field)).then_with(|| a.1.cmp(b.1));
        match direction {
            Direction::Asc => by_value,
            Direction::Desc => by_value.reverse(),
        }
    }

    /// The `next` of an ordered page that ended with this record: its order value and id (the id
    /// alone when the record lacks the field, which is not the same as holding null).
    pub fn position(&self, fields: &Fields, id: &str) -> String {
        let value = self
            .order_by
            .as_ref()
            .and_then(|(field, _)| fields.get(field));
        match value {
            Some(value) => serde_json::json!([value, id]).to_string(),
            None => serde_json::json!([id]).to_string(),
        }
    }

    /// Whether a record comes after `position` (a `next` this query gave) in the query's order.
    pub fn is_after(&self, position: &Position, fields: &Fields, id: &str) -> bool {
        let mut at = Fields::new();
        if let (Some((field, _)), Some(value)) = (&self.order_by, &position.value) {
            at.insert(field.clone(), value.clone());
        }
        self.compare((fields, id), (&at, &position.id)) == Ordering::Greater
    }
}

/// Where an ordered page ended: what `Query::position` wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Position {
    pub value: Option<Value>,
    pub id: String,
}

impl Position {
    pub fn parse(text: &str) -> Result<Position, QueryError> {
        let bad = || QueryError::BadPosition(format!("{text:?} is not one"));
        match serde_json::from_str::<Value>(text).map_err(|_| bad())? {
            Value::Array(mut parts) if (1..=2).contains(&parts.len()) => {
                let id = match parts.pop() {
                    Some(Value::String(id)) => id,
                    _ => return Err(bad()),
                };
                Ok(Position {
                    value: parts.pop(),
                    id,
                })
            }
            _ => Err(bad()),
        }
    }
}

fn is_scalar(value: &Value) -> bool {
    !matches!(value, Value::Object(_) | Value::Array(_))
}

fn holds(condition: &Condition, field: Option<&Value>) -> bool {
    let wanted = condition.value.as_ref();
    match condition.op {
        Op::Exists => field.is_some() == wanted.and_then(Value::as_bool).unwrap_or(true),
        Op::In => match (field, wanted) {
            (Some(field), Some(Value::Array(values))) => values
                .iter()
                .any(|v| same_kind_cmp(field, v) == Some(Ordering::Equal)),
            _ => false,
        },
        op => {
            let (Some(field), Some(wanted)) = (field, wanted) else {
                return false;
            };
            let Some(order) = same_kind_cmp(field, wanted) else {
                return false;
            };
            match op {
                Op::Eq => order == Ordering::Equal,
                Op::Lt => order == Ordering::Less,
                Op::Le => order != Ordering::Greater,
                Op::Gt => order == Ordering::Greater,
                Op::Ge => order != Ordering::Less,
                Op::In | Op::Exists => false,
            }
        }
    }
}

/// Two scalars of one kind in order; `None` for values of different kinds, or not scalars.
pub fn same_kind_cmp(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Null, Value::Null) => Some(Ordering::Equal),
        (Value::Bool(a), Value::Bool(b)) => Some(a.cmp(b)),
        (Value::Number(a), Value::Number(b)) => Some(number_cmp(a, b)),
        (Value::String(a), Value::String(b)) => Some(a.as_bytes().cmp(b.as_bytes())),
        _ => None,
    }
}

/// Numbers as numbers, exactly: integers (i64 and u64 alike) and floats by their value, so that
/// `1` equals `1.0` and two integers that round to one float still differ.
fn number_cmp(a: &serde_json::Number, b: &serde_json::Number) -> Ordering {
    let (a, b) = (number_key(a), number_key(b));
    a.0.total_cmp(&b.0).then(a.1.cmp(&b.1))
}

/// A number as a pair whose order is the numbers' exact order: its nearest float (`-0.0` taken
/// as `0.0`), then, among numbers that round to one float (integers only: a float that is not
/// whole rounds from no integer), the exact integer. Rounding to the nearest float keeps order,
/// so the float decides wherever it differs.
pub fn number_key(n: &serde_json::Number) -> (f64, i128) {
    let approx = n.as_f64().unwrap_or(0.0) + 0.0;
    let exact = match (n.as_i64(), n.as_u64()) {
        (Some(i), _) => i128::from(i),
        (None, Some(u)) => i128::from(u),
        // A whole float beyond i128 shares its float with no integer JSON carries.
        (None, None) if approx.fract() == 0.0 => approx as i128,
        (None, None) => 0,
    };
    (approx, exact)
}

/// The rank of a value's kind in an order: missing, null, booleans, numbers, strings, the rest.
fn kind_rank(value: Option<&Value>) -> u8 {
    match value {
        None => 0,
        Some(Value::Null) => 1,
        Some(Value::Bool(_)) => 2,
        Some(Value::Number(_)) => 3,
        Some(Value::String(_)) => 4,
        Some(Value::Array(_)) => 5,
        Some(Value::Object(_)) => 6,
    }
}

/// The total order of field values an ordered query uses.
pub fn collate(a: Option<&Value>, b: Option<&Value>) -> Ordering {
    kind_rank(a).cmp(&kind_rank(b)).then_with(|| match (a, b) {
        (Some(a), Some(b)) => {
            same_kind_cmp(a, b).unwrap_or_else(|| a.to_string().cmp(&b.to_string()))
        }
        _ => Ordering::Equal,
    })
}

/// A condition as the CLI's `--where` writes it: `FIELD=VALUE`, `FIELD>VALUE`, `FIELD>=VALUE`,
/// `FIELD<VALUE`, `FIELD<=VALUE`, `FIELD in V1,V2,...`, `FIELD exists`, `FIELD missing`. A
/// value that reads as JSON (`2024`, `true`, `null`, `"quoted"`) is that value; any other is a
/// string.
pub fn parse_condition(text: &str) -> Result<Condition, QueryError> {
    let unparsed = || QueryError::Unparsed(text.to_owned());
    let trimmed = text.trim();
    for (suffix, exists) in [(" exists", true), (" missing", false)] {
        if let Some(field) = trimmed.strip_suffix(suffix) {
            return Ok(Condition {
                field: field.trim().to_owned(),
                op: Op::Exists,
                value: Some(Value::Bool(exists)),
            });
        }
    }
    if let Some((field, values)) = trimmed.split_once(" in ") {
        return Ok(Condition {
            field: field.trim().to_owned(),
            op: Op::In,
            value: Some(Value::Array(
                values.split(',').map(|v| scalar(v.trim())).collect(),
            )),
        });
    }
    let at = trimmed.find(['=', '<', '>']).ok_or_else(unparsed)?;
    let (field, rest) = trimmed.split_at(at);
    let (op, value) = [
        (">=", Op::Ge),
        ("<=", Op::Le),
        ("=", Op::Eq),
        (">", Op::Gt),
        ("<", Op::Lt),
    ]
    .into_iter()
    .find_map(|(sign, op)| rest.strip_prefix(sign).map(|value| (op, value)))
    .ok_or_else(unparsed)?;
    if field.trim().is_empty() {
        return Err(unparsed());
    }
    Ok(Condition {
        field: field.trim().to_owned(),
        op,
        value: Some(scalar(value.trim())),
    })
}

fn scalar(text: &str) -> Value {
    match serde_json::from_str::<Value>(text) {
        Ok(value) if is_scalar(&value) => value,
        _ => Value::String(text.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(v: Value) -> Fields {
        v.as_object().cloned().unwrap_or_default()
    }

    fn query(conditions: &[&str]) -> Query {
        let parsed = conditions
            .iter()
            .map(|c| parse_condition(c))
            .collect::<Result<Vec<_>, _>>();
        Query::new(parsed.unwrap_or_default(), None).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn conditions_compare_within_a_kind() {
        let r = fields(json!({"year": 2024, "name": "b", "paid": true, "note": null, "tags": [1]}));
        for (condition, expected) in [
            ("year=2024", true),
            ("year=2024.0", true),
            ("year>=2024", true),
            ("year>2024", false),
            ("year<2025", true),
            ("year=\"2024\"", false),
            ("name=b", true),
            ("name>a", true),
            ("name<a", false),
            ("name in a,b", true),
            ("year in 1,2024", true),
            ("paid=true", true),
            ("note=null", true),
            ("tags exists", true),
            ("tags=1", false),
            ("missing exists", false),
            ("missing missing", true),
            ("name<=b", true),
        ] {
            assert_eq!(query(&[condition]).matches(&r), expected, "{condition}");
        }
        assert!(query(&["year>=2024", "name=b"]).matches(&r));
        assert!(!query(&["year>=2024", "name=c"]).matches(&r));
    }

    #[test]
    fn unreadable_conditions_are_refused_with_what_to_write() {
        for text in ["year", "=5", "year!5"] {
            assert!(parse_condition(text).is_err(), "{text}");
        }
        let bad = Condition {
            field: "a".into(),
            op: Op::Lt,
            value: Some(json!({"x": 1})),
        };
        assert!(Query::new(vec![bad], None).is_err());
        let no_list = Condition {
            field: "a".into(),
            op: Op::In,
            value: Some(json!(1)),
        };
        assert!(Query::new(vec![no_list], None).is_err());
    }

    #[test]
    fn an_order_goes_by_kind_then_value_then_id_and_pages_resume_after_a_position() {
        let q = Query::new(Vec::new(), Some(("n".into(), Direction::Asc)))
            .unwrap_or_else(|e| panic!("{e}"));
        let mut records = [
            (fields(json!({"n": "x"})), "1"),
            (fields(json!({"n": 2})), "2"),
            (fields(json!({})), "3"),
            (fields(json!({"n": 10})), "4"),
            (fields(json!({"n": 2})), "0"),
            (fields(json!({"n": null})), "5"),
        ];
        records.sort_by(|a, b| q.compare((&a.0, a.1), (&b.0, b.1)));
        let ids: Vec<&str> = records.iter().map(|r| r.1).collect();
        assert_eq!(ids, ["3", "5", "0", "2", "4", "1"]);
        let position = Position::parse(&q.position(&records[2].0, records[2].1))
            .unwrap_or_else(|e| panic!("{e}"));
        let after: Vec<&str> = records
            .iter()
            .filter(|r| q.is_after(&position, &r.0, r.1))
            .map(|r| r.1)
            .collect();
        assert_eq!(after, ["2", "4", "1"]);
        assert!(Position::parse("[1]").is_err());
        // A null value is not a missing one: a page that ended on a null resumes after it.
        let null = fields(json!({"n": null}));
        let at = Position::parse(&q.position(&null, "5")).unwrap_or_else(|e| panic!("{e}"));
        assert!(!q.is_after(&at, &null, "5"));
        assert!(q.is_after(&at, &fields(json!({"n": null})), "6"));
        assert!(!q.is_after(&at, &fields(json!({})), "9"));
    }
}
