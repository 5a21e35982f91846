//! Arbitrary JSON PUT and PATCHed at every path of the swagger (and a few it lacks),
//! before and after the VM starts: the router never panics, answers every refusal
//! with a 400 whose body is the swagger's `Error`, answers as the swagger lists, and a
//! refused request changes nothing.

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{select, Index};
use serde_json::{Map, Value};

use super::schema::{operation, operations, reference, sample, swagger, validate, Fill, SAMPLE_STRING};
use super::{checked_response, files, Harness};

/// Every property name, enum value and path template of the swagger, so that
/// arbitrary objects hit real fields and values often.
struct Vocabulary {
    names: Vec<String>,
    strings: Vec<String>,
    templates: Vec<String>,
    bodies: Vec<Value>,
}

/// The swagger's vocabulary, gathered once.
fn vocabulary() -> &'static Vocabulary {
    static VOCABULARY: std::sync::OnceLock<Vocabulary> = std::sync::OnceLock::new();
    VOCABULARY.get_or_init(|| {
        let (mut names, mut strings) = (Vec::new(), Vec::new());
        collect(&swagger()["definitions"], &mut names, &mut strings);
        let f = files();
        strings.extend([&f.kernel, &f.initrd, &f.disk].map(String::clone));
        strings.extend(["", "/", "tap0", "eth0", "06:00:ac:10:00:02", "unixgram=/tmp/n.sock"].map(String::from));
        names.sort();
        names.dedup();
        strings.sort();
        strings.dedup();
        let mut templates: Vec<String> = operations().iter().map(|op| op.template.clone()).collect();
        templates.dedup();
        let bodies = operations().iter().filter_map(|op| op.body.as_ref().map(|(s, _)| s.clone())).collect();
        Vocabulary { names, strings, templates, bodies }
    })
}

/// The property names and enum values under `schema`.
fn collect(schema: &Value, names: &mut Vec<String>, strings: &mut Vec<String>) {
    match schema {
        Value::Object(object) => {
            if let Some(props) = object.get("properties").and_then(Value::as_object) {
                names.extend(props.keys().cloned());
            }
            let choices = object.get("enum").and_then(Value::as_array).into_iter().flatten();
            strings.extend(choices.filter_map(Value::as_str).map(String::from));
            for sub in object.values() {
                collect(sub, names, strings);
            }
        }
        Value::Array(items) => items.iter().for_each(|i| collect(i, names, strings)),
        _ => {}
    }
}

/// An object key: mostly one the swagger defines.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![3 => select(vocabulary().names.clone()), 1 => "[a-z_-]{0,10}"]
}

/// A string: mostly an enum value of the swagger or a fixture's path.
fn string() -> impl Strategy<Value = String> {
    prop_oneof![3 => select(vocabulary().strings.clone()), 1 => "\\PC{0,16}"]
}

/// Any JSON value, up to a few levels deep.
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        (0u64..70_000).prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f).map(Value::Number)),
        string().prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..5).prop_map(Value::Array),
            vec((key(), inner), 0..6).prop_map(|fields| Value::Object(fields.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// `value` with the values that name host things made real: the fixture's files, a
/// tap, a MAC, a socket path that is free.
fn realistic(value: &mut Value) {
    let f = files();
    match value {
        Value::Object(object) => {
            for (name, field) in object.iter_mut() {
                let real = match name.as_str() {
                    "kernel_image_path" => Some(f.kernel.clone()),
                    "initrd_path" => Some(f.initrd.clone()),
                    "path_on_host" => Some(f.disk.clone()),
                    "uds_path" => Some(f.dir.join("p.sock").display().to_string()),
                    "host_dev_name" => Some("tap0".into()),
                    "guest_mac" => Some("06:00:ac:10:00:02".into()),
                    _ => None,
                };
                match real {
                    Some(real) if field.is_string() => *field = Value::from(real),
                    _ => realistic(field),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(realistic),
        _ => {}
    }
}

/// A sample of the request body `schema` (realistic, or as sampled), left whole or
/// with one property removed, replaced by arbitrary JSON, or added.
fn shaped(schema: Value) -> impl Strategy<Value = Value> {
    (any::<bool>(), any::<bool>(), 0u8..5, any::<Index>(), key(), json()).prop_map(
        move |(every, real, change, at, name, value)| {
            let mut body = sample(&schema, if every { Fill::Every } else { Fill::Required });
            if real {
                realistic(&mut body);
            }
            if let Some(object) = body.as_object_mut() {
                let existing: Vec<String> = object.keys().cloned().collect();
                let target = if existing.is_empty() { name.clone() } else { at.get(&existing).clone() };
                match change {
                    0 | 1 => {}
                    2 => drop(object.remove(&target)),
                    3 => drop(object.insert(target, value)),
                    _ => drop(object.insert(name, value)),
                }
            }
            body
        },
    )
}

/// A body for `schema`: shaped or arbitrary JSON, sometimes cut short, sometimes none.
fn body(schema: Value) -> impl Strategy<Value = Option<Vec<u8>>> {
    prop_oneof![
        3 => json().prop_map(|v| Some(v.to_string().into_bytes())),
        6 => shaped(schema.clone()).prop_map(|v| Some(v.to_string().into_bytes())),
        1 => (shaped(schema), any::<Index>()).prop_map(|(v, at)| {
            let text = v.to_string().into_bytes();
            Some(text[..at.index(text.len())].to_vec())
        }),
        1 => Just(None),
    ]
}

/// An id for a path: the one samples use, or any.
fn id() -> impl Strategy<Value = String> {
    prop_oneof![3 => Just(SAMPLE_STRING.to_string()), 1 => "[a-zA-Z0-9_.-]{0,6}"]
}

/// A PUT or PATCH: mostly one of the swagger's, with a body for it; sometimes any
/// path with any method and body (one of another operation's, or arbitrary).
fn request() -> impl Strategy<Value = (&'static str, String, Option<Vec<u8>>)> {
    let ops: Vec<_> = operations().iter().filter(|op| op.method != "GET").collect();
    let own = select(ops).prop_flat_map(|op| {
        let method = if op.method == "PUT" { "PUT" } else { "PATCH" };
        let schema = op.body.as_ref().map_or(Value::Null, |(s, _)| s.clone());
        (Just(method), id().prop_map(move |id| op.path(&id)), body(schema))
    });
    let bodies = vocabulary().bodies.clone();
    let templates = select(vocabulary().templates.clone());
    let path = (templates, id()).prop_map(|(template, id)| {
        template.split('/').map(|s| if s.starts_with('{') { id.as_str() } else { s }).collect::<Vec<_>>().join("/")
    });
    let odd = select(vec!["/", "/nothing", "/drives", "/drives/", "/drives/a/b", "//vm", "/vm/", "/balloon/"]);
    let path = prop_oneof![4 => path, 1 => odd.prop_map(String::from)];
    let any = (select(vec!["PUT", "PATCH"]), path, select(bodies).prop_flat_map(body));
    prop_oneof![3 => own, 1 => any]
}

/// `path` as Firecracker's router reads it (and hvrun's): leading slashes and a
/// trailing one dropped (`//vm/` is `/vm`).
fn canonical(path: &str) -> String {
    format!("/{}", path.trim_start_matches('/').split_terminator('/').collect::<Vec<_>>().join("/"))
}

/// What a refused request must leave as it was.
fn state(h: &mut Harness) -> (Option<String>, Option<String>, String) {
    let config = h.raw("GET", "/vm/config", None).body;
    let info = h.raw("GET", "/", None).body;
    let seen = h.seen.lock().unwrap();
    let calls = format!(
        "{:?} {:?} {} {} {}",
        seen.booted.is_some(),
        seen.restored.is_some(),
        seen.snapshots.len(),
        seen.presses,
        seen.loggers.len()
    );
    (config, info, calls)
}

proptest! {
    // No regression files: they would land outside this directory.
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// Whatever is PUT or PATCHed wherever, the router answers as the swagger says, and
    /// a refusal is a 400 with Firecracker's error body that changed nothing.
    #[test]
    fn arbitrary_bodies_at_every_path_are_answered_or_refused_cleanly(
        started in any::<bool>(),
        requests in vec(request(), 1..8),
    ) {
        let mut h = if started { Harness::started() } else { Harness::new() };
        for (method, path, body) in requests {
            let before = state(&mut h);
            let response = h.raw(method, &path, body.as_deref());
            let what = format!("{method} {path} {:?}", body.as_deref().map(String::from_utf8_lossy));
            let canonical = canonical(&path);
            if operation(method, &canonical).is_some() {
                let checked = checked_response(method, &canonical, &response);
                prop_assert!(checked.is_ok(), "{}: {:?}", what, checked);
            }
            if response.status >= 300 {
                prop_assert_eq!(response.status, 400, "{}: {:?}", what, response.body);
                let error: Value = serde_json::from_str(response.body.as_deref().unwrap_or_default())
                    .map_err(|e| TestCaseError::fail(format!("{what}: {e}")))?;
                let valid = validate(&reference("Error"), &error, &[]);
                prop_assert!(valid.is_ok(), "{}: {:?}", what, valid);
                prop_assert!(error["fault_message"].is_string(), "{}: {}", what, error);
                prop_assert_eq!(state(&mut h), before, "{} was refused ({}) but changed the state", what, error);
            } else {
                let known = operation(method, &canonical).is_some();
                prop_assert!(known, "{}: {} for a path the swagger lacks", what, response.status);
            }
        }
    }
}
