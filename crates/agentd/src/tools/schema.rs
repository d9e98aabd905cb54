//! Tool arguments checked against the tool's JSON Schema (draft 2020-12, every keyword), with the [`jsonschema`]
//! crate. Each schema is compiled once, when the tools file is loaded; a schema that does not compile refuses the
//! start. A violation is told to the model in a short sentence that names the argument (`args.limit must be at least
//! 1`), so it can correct the call.

use jsonschema::error::{TypeKind, ValidationErrorKind};
use jsonschema::paths::LocationSegment;
use jsonschema::{ValidationError, Validator};
use serde_json::Value;

/// A compiled schema of a tool's arguments.
#[derive(Debug)]
pub struct ArgsSchema {
    validator: Validator,
}

impl ArgsSchema {
    /// Compiles `schema` as draft 2020-12; the error says why it is not a valid schema.
    pub fn compile(schema: &Value) -> Result<Self, String> {
        jsonschema::draft202012::meta::validate(schema).map_err(|e| e.to_string())?;
        let validator = jsonschema::draft202012::new(schema).map_err(|e| e.to_string())?;
        Ok(Self { validator })
    }

    /// Checks `args`; the first violation, as the model is told it.
    pub fn check(&self, args: &Value) -> Result<(), String> {
        match self.validator.validate(args) {
            Ok(()) => Ok(()),
            Err(error) => Err(describe(&error)),
        }
    }
}

/// `args`, `args.limit`, `args.tags[0]`: where in the arguments a violation is.
fn place(error: &ValidationError<'_>) -> String {
    let mut at = String::from("args");
    for segment in error.instance_path() {
        match segment {
            LocationSegment::Property(name) => {
                at.push('.');
                at.push_str(&name);
            }
            LocationSegment::Index(i) => at.push_str(&format!("[{i}]")),
        }
    }
    at
}

fn describe(error: &ValidationError<'_>) -> String {
    let at = place(error);
    match error.kind() {
        ValidationErrorKind::Required { property } => match property.as_str() {
            Some(name) => format!("{at}.{name} is required"),
            None => format!("{at}.{property} is required"),
        },
        ValidationErrorKind::AdditionalProperties { unexpected } => {
            format!("{at}.{} is not a known argument", unexpected.join(", "))
        }
        ValidationErrorKind::Type {
            kind: TypeKind::Single(kind),
        } => format!("{at} must be of type {kind}"),
        ValidationErrorKind::Enum { options } => format!("{at} must be one of {options}"),
        _ => format!("{at}: {error}"),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn violations_name_the_argument() {
        let schema = ArgsSchema::compile(&json!({
            "type": "object",
            "required": ["id"],
            "additionalProperties": false,
            "properties": {
                "id": {"type": "string", "pattern": "^[a-z]+$"},
                "limit": {"type": "integer", "minimum": 1},
                "kind": {"enum": ["a", "b"]},
                "tags": {"type": "array", "items": {"type": "string"}},
                "either": {"oneOf": [{"type": "string"}, {"type": "integer"}]},
            },
        }))
        .unwrap();
        assert!(
            schema
                .check(&json!({"id": "x", "limit": 3, "kind": "a", "tags": ["t"], "either": 1}))
                .is_ok()
        );
        for (args, error) in [
            (json!({}), "args.id is required"),
            (json!({"id": 1}), "args.id must be of type string"),
            (
                json!({"id": "x", "limit": 1.5}),
                "args.limit must be of type integer",
            ),
            (json!({"id": "x", "kind": "c"}), "args.kind must be one of"),
            (
                json!({"id": "x", "tags": [1]}),
                "args.tags[0] must be of type string",
            ),
            (json!("x"), "args must be of type object"),
            (
                json!({"id": "x", "limit": 0}),
                "args.limit: 0 is less than the minimum of 1",
            ),
            (
                json!({"id": "X1"}),
                "args.id: \"X1\" does not match \"^[a-z]+$\"",
            ),
            (json!({"id": "x", "either": true}), "args.either:"),
            (
                json!({"id": "x", "other": 1}),
                "args.other is not a known argument",
            ),
        ] {
            let got = schema.check(&args).unwrap_err();
            assert!(got.starts_with(error), "{args}: {got}");
        }
    }

    #[test]
    fn a_schema_that_does_not_compile_is_refused() {
        assert!(ArgsSchema::compile(&json!({"type": "objekt"})).is_err());
        assert!(ArgsSchema::compile(&json!({"type": "object", "minimum": "one"})).is_err());
    }
}
