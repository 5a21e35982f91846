//! Firecracker's OpenAPI (swagger 2.0) description, vendored as
//! `firecracker-swagger.json`: its operations, a validator for the subset of JSON
//! Schema it uses, and sample objects built from its definitions.
//!
//! The validator is closed where the swagger is silent: an object without
//! `additionalProperties` takes only the properties it lists (Firecracker's serde
//! objects deny unknown fields), except the hvrun extensions a caller names.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde_json::{json, Map, Value};

/// The schema keywords the validator checks.
const CHECKED: &[&str] = &[
    "$ref",
    "type",
    "required",
    "properties",
    "additionalProperties",
    "enum",
    "minimum",
    "maximum",
    "items",
    "format",
];
/// Keywords that only document (no effect on what is valid).
const DOCUMENTING: &[&str] = &["description", "default", "readOnly", "example"];

/// The swagger document, parsed once.
pub fn swagger() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(|| serde_json::from_str(include_str!("firecracker-swagger.json")).expect("the vendored swagger"))
}

/// The definition `name` (panics if the swagger has none: a typo in a test).
pub fn definition(name: &str) -> &'static Value {
    swagger()["definitions"].get(name).unwrap_or_else(|| panic!("the swagger has no definition {name}"))
}

/// A schema reference to definition `name`.
pub fn reference(name: &str) -> Value {
    json!({ "$ref": format!("#/definitions/{name}") })
}

/// `schema` with its `$ref` followed (a `$ref`'s siblings are ignored, as swagger 2.0 says).
fn resolve(schema: &Value) -> &Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(target) => {
            let name = target.strip_prefix("#/definitions/").unwrap_or_else(|| panic!("unsupported $ref {target}"));
            resolve(definition(name))
        }
        None => schema,
    }
}

/// The properties object `schema` defines, if it is an object schema.
pub fn properties(schema: &Value) -> Option<&Map<String, Value>> {
    resolve(schema).get("properties").and_then(Value::as_object)
}

/// One path and method of the swagger.
#[derive(Debug, Clone)]
pub struct Operation {
    /// The method, upper case (`PUT`).
    pub method: String,
    /// The path template (`/drives/{drive_id}`).
    pub template: String,
    /// The body parameter's schema, and whether the body is required.
    pub body: Option<(Value, bool)>,
    /// The responses: status (`"204"`, `"default"`) to schema (`None`: no body).
    pub responses: BTreeMap<String, Option<Value>>,
}

impl Operation {
    /// `template` with each `{parameter}` replaced by `id`.
    pub fn path(&self, id: &str) -> String {
        self.template.split('/').map(|s| if s.starts_with('{') { id } else { s }).collect::<Vec<_>>().join("/")
    }

    /// Whether `path` is an instance of the template.
    fn matches(&self, path: &str) -> bool {
        let (t, p): (Vec<_>, Vec<_>) = (self.template.split('/').collect(), path.split('/').collect());
        t.len() == p.len() && t.iter().zip(&p).all(|(t, p)| t == p || (t.starts_with('{') && !p.is_empty()))
    }

    /// The schema of the response with `status`: `Ok(None)` for a listed status without
    /// a body, `Err` if the status is not listed (and, for an error status, there is no
    /// `default`: `default` stands for errors, never for a success).
    pub fn response(&self, status: u16) -> Result<Option<&Value>, String> {
        if let Some(schema) = self.responses.get(&status.to_string()) {
            return Ok(schema.as_ref());
        }
        match self.responses.get("default") {
            Some(schema) if status >= 400 => Ok(schema.as_ref()),
            _ => Err(format!(
                "{} {}: status {status} is not one the swagger lists ({:?})",
                self.method,
                self.template,
                self.responses.keys().collect::<Vec<_>>()
            )),
        }
    }
}

/// Every operation of the swagger, in its order.
pub fn operations() -> &'static [Operation] {
    static OPS: OnceLock<Vec<Operation>> = OnceLock::new();
    OPS.get_or_init(|| {
        let paths = swagger()["paths"].as_object().expect("swagger paths");
        let mut ops = Vec::new();
        for (template, methods) in paths {
            for (method, op) in methods.as_object().expect("a path's methods") {
                let body = op["parameters"].as_array().into_iter().flatten().find(|p| p["in"] == "body");
                let body = body.map(|p| (p["schema"].clone(), p["required"].as_bool().unwrap_or(false)));
                let responses = op["responses"]
                    .as_object()
                    .expect("an operation's responses")
                    .iter()
                    .map(|(status, r)| (status.clone(), r.get("schema").cloned()))
                    .collect();
                ops.push(Operation { method: method.to_uppercase(), template: template.clone(), body, responses });
            }
        }
        ops
    })
}

/// The operation `method` `path` is an instance of.
pub fn operation(method: &str, path: &str) -> Option<&'static Operation> {
    operations().iter().find(|op| op.method == method && op.matches(path))
}

/// Checks `value` against `schema`; properties not in the schema are errors unless
/// named in `extensions`. The error names where in `value` it is (`$.drives[0].x`).
pub fn validate(schema: &Value, value: &Value, extensions: &[&str]) -> Result<(), String> {
    check(schema, value, extensions, "$")
}

/// [`validate`] at `at`.
fn check(schema: &Value, value: &Value, extensions: &[&str], at: &str) -> Result<(), String> {
    let schema = resolve(schema);
    let fail = |what: String| Err(format!("{at}: {what} (value {value})"));
    if let Some(choices) = schema.get("enum").and_then(Value::as_array) {
        if !choices.contains(value) {
            return fail(format!("not one of {}", Value::Array(choices.clone())));
        }
    }
    let kind = schema.get("type").and_then(Value::as_str);
    let right = match kind {
        None => true,
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        Some("string") => value.is_string(),
        Some("boolean") => value.is_boolean(),
        Some("integer") => value.is_i64() || value.is_u64(),
        Some("number") => value.is_number(),
        Some(other) => panic!("{at}: the validator does not know type {other}"),
    };
    if !right {
        return fail(format!("not of type {}", kind.unwrap_or_default()));
    }
    if let Some(number) = value.as_f64() {
        let limit = |k: &str| schema.get(k).and_then(Value::as_f64);
        if limit("minimum").is_some_and(|m| number < m) || limit("maximum").is_some_and(|m| number > m) {
            return fail(format!("outside [{:?}, {:?}]", limit("minimum"), limit("maximum")));
        }
        let fits = match schema.get("format").and_then(Value::as_str) {
            Some("int32") => value.as_i64().is_some_and(|n| i32::try_from(n).is_ok()),
            Some("int64") => value.is_i64(),
            _ => true,
        };
        if !fits {
            return fail(format!("does not fit {}", schema["format"]));
        }
    }
    if let (Some(items), Some(elements)) = (schema.get("items"), value.as_array()) {
        for (i, element) in elements.iter().enumerate() {
            check(items, element, extensions, &format!("{at}[{i}]"))?;
        }
    }
    let Some(object) = value.as_object() else { return Ok(()) };
    for name in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
        let name = name.as_str().expect("required names are strings");
        if !object.contains_key(name) {
            return fail(format!("lacks required property `{name}`"));
        }
    }
    let listed = schema.get("properties").and_then(Value::as_object);
    for (name, field) in object {
        let at = format!("{at}.{name}");
        match (listed.and_then(|p| p.get(name)), schema.get("additionalProperties")) {
            (Some(property), _) => check(property, field, extensions, &at)?,
            (None, Some(Value::Bool(true))) => {}
            (None, Some(extra @ Value::Object(_))) => check(extra, field, extensions, &at)?,
            (None, _) if extensions.contains(&name.as_str()) => {}
            (None, _) => return Err(format!("{at}: not a property the swagger defines")),
        }
    }
    Ok(())
}

/// The keywords `schema` and its subschemas use that the validator neither checks nor
/// knows to be documentation, with where they are.
pub fn unknown_keywords(schema: &Value, at: &str) -> Vec<String> {
    let mut found = Vec::new();
    let Some(object) = schema.as_object() else { return found };
    for (key, sub) in object {
        let here = format!("{at}.{key}");
        if !CHECKED.contains(&key.as_str()) && !DOCUMENTING.contains(&key.as_str()) {
            found.push(here.clone());
        }
        match key.as_str() {
            "properties" => {
                for (name, property) in sub.as_object().into_iter().flatten() {
                    found.extend(unknown_keywords(property, &format!("{here}.{name}")));
                }
            }
            "items" | "additionalProperties" => found.extend(unknown_keywords(sub, &here)),
            _ => {}
        }
    }
    found
}

/// Where under `schema` enums are (JSON pointers into an [`Fill::Every`] sample, arrays
/// at index 0), with their values.
pub fn enums(schema: &Value) -> Vec<(String, Vec<Value>)> {
    fn walk(schema: &Value, at: String, found: &mut Vec<(String, Vec<Value>)>) {
        let schema = resolve(schema);
        if let Some(choices) = schema.get("enum").and_then(Value::as_array) {
            found.push((at.clone(), choices.clone()));
        }
        for (name, property) in schema.get("properties").and_then(Value::as_object).into_iter().flatten() {
            walk(property, format!("{at}/{name}"), found);
        }
        if let Some(items) = schema.get("items") {
            walk(items, format!("{at}/0"), found);
        }
    }
    let mut found = Vec::new();
    walk(schema, String::new(), &mut found);
    found
}

/// How much of a schema a sample fills in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// Only required properties; booleans false, arrays empty.
    Required,
    /// Every property (and one entry in maps and arrays); booleans true.
    Every,
}

/// The string every sample uses: also a valid resource id, so that a sample body's id
/// matches a path built with [`Operation::path`]`(SAMPLE_STRING)`.
pub const SAMPLE_STRING: &str = "x1";

/// A value valid per `schema`: the first enum value, the minimum (or 1) of integers,
/// [`SAMPLE_STRING`] for strings.
pub fn sample(schema: &Value, fill: Fill) -> Value {
    let schema = resolve(schema);
    if let Some(first) = schema.get("enum").and_then(|e| e.get(0)) {
        return first.clone();
    }
    match schema.get("type").and_then(Value::as_str) {
        Some("object") | None => {
            let mut object = Map::new();
            let required: Vec<&str> =
                schema["required"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
            for (name, property) in schema.get("properties").and_then(Value::as_object).into_iter().flatten() {
                if fill == Fill::Every || required.contains(&name.as_str()) {
                    object.insert(name.clone(), sample(property, fill));
                }
            }
            match schema.get("additionalProperties") {
                Some(extra @ Value::Object(_)) if fill == Fill::Every => {
                    object.insert("key".into(), sample(extra, fill));
                }
                Some(Value::Bool(true)) if fill == Fill::Every => {
                    object.insert("key".into(), json!("value"));
                }
                _ => {}
            }
            Value::Object(object)
        }
        Some("array") => match fill {
            Fill::Every => json!([sample(&schema["items"], fill)]),
            Fill::Required => json!([]),
        },
        Some("string") => json!(SAMPLE_STRING),
        Some("boolean") => json!(fill == Fill::Every),
        Some("integer" | "number") => {
            let low = schema.get("minimum").and_then(Value::as_u64).unwrap_or(1);
            json!(schema.get("maximum").and_then(Value::as_u64).map_or(low, |high| low.min(high)))
        }
        Some(other) => panic!("no sample for type {other}"),
    }
}
