//! From a parsed webhook body to what must be linked: the event id and type, the SprintHub
//! object id and the lead ids (or the key that resolves to them). Pure: no I/O, no HTTP.
//! Values are read through the source's references (`/pointer`, `header:NAME`, `query:NAME`)
//! from an [`Input`]: the body as its content type reads ([`body`]) and the request's headers
//! and query parameters that some reference names.

pub mod body;

use std::collections::BTreeMap;

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::config::{
    DefinitionId, FieldValue, LeadField, LookupKind, ObjectRule, ObjectSpec, Scheme, SourceConfig,
    ValueRef,
};
use crate::domain::{LeadId, ObjectId};
use crate::store::StoredRequest;

/// What a source's references read: the parsed body and the headers and query parameters of
/// the request (those some reference names; the others are never kept).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Input {
    pub body: Value,
    /// Lower-case header names.
    pub headers: BTreeMap<String, Value>,
    pub query: BTreeMap<String, Value>,
}

impl Input {
    /// A JSON body and nothing else.
    pub fn json(body: Value) -> Input {
        Input {
            body,
            ..Default::default()
        }
    }

    /// Reads a request as stored: the body as its content type says, with its headers and
    /// query parameters. The request path and a replay both go through here, so they see the
    /// same values.
    pub fn read(req: &StoredRequest) -> Result<Input, body::BodyError> {
        let strings = |m: &BTreeMap<String, String>| {
            m.iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect()
        };
        Ok(Input {
            body: body::parse(req.content_type.as_deref(), &req.body)?,
            headers: strings(&req.headers),
            query: strings(&req.query),
        })
    }

    /// The value a reference finds, if any.
    pub fn get(&self, r: &ValueRef) -> Option<&Value> {
        match r {
            ValueRef::Pointer(p) => self.body.pointer(p),
            ValueRef::Header(n) => self.headers.get(n),
            ValueRef::Query(n) => self.query.get(n),
        }
    }
}

/// The longest event id, event type, object id, lead id or lookup key accepted, in bytes.
pub const MAX_ID_BYTES: usize = 256;
/// The most (distinct) lead ids one event may name.
pub const MAX_LEAD_IDS: usize = 100;

/// Why an event cannot be stored at all: answered with a 400 and this code, nothing stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unstorable {
    pub code: UnstorableValue,
    pub message: String,
}

/// Which value made an event unstorable (the HTTP layer names each with its error code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnstorableValue {
    EventId,
    EventType,
    /// An object id, a lead id or a lead key.
    Id,
}

fn unstorable(code: UnstorableValue, message: String) -> Unstorable {
    Unstorable { code, message }
}

/// Whether text holds a control character (C0, DEL or C1: U+0000 to U+001F, U+007F to
/// U+009F). PostgreSQL cannot store U+0000 in text, and none of them belongs in an id.
pub fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

/// The event id must be at most `MAX_ID_BYTES` long and free of control characters; it is the
/// key the sender retries with, so a bad one is refused rather than parked.
pub fn check_event_id(id: &str) -> Result<(), Unstorable> {
    if id.len() > MAX_ID_BYTES {
        return Err(unstorable(
            UnstorableValue::EventId,
            format!(
                "the event id is {} bytes long; at most {MAX_ID_BYTES} are accepted",
                id.len()
            ),
        ));
    }
    if has_control(id) {
        return Err(unstorable(
            UnstorableValue::EventId,
            "the event id contains a control character".into(),
        ));
    }
    Ok(())
}

/// Refuses an event whose type, object id, lead ids or lookup key hold control characters
/// (which storage cannot keep, or an operator could not read), and an event type longer than
/// `MAX_ID_BYTES`. Values that are merely too long or too many are not refused here: `map`
/// parks them with a reason.
pub fn check_storable(source: &SourceConfig, body: &Input) -> Result<(), Unstorable> {
    if let Some(t) = event_type(source, body) {
        if t.len() > MAX_ID_BYTES {
            return Err(unstorable(
                UnstorableValue::EventType,
                format!("the event type is longer than {MAX_ID_BYTES} bytes"),
            ));
        }
        if has_control(&t) {
            return Err(unstorable(
                UnstorableValue::EventType,
                "the event type contains a control character".into(),
            ));
        }
    }
    let bad = |what: &str, p: &ValueRef| {
        unstorable(
            UnstorableValue::Id,
            format!("the {what} at {p} contains a control character"),
        )
    };
    if let ObjectRule::FromBody(p) = source.object_rule()
        && body
            .get(p)
            .and_then(id_text)
            .is_some_and(|id| has_control(&id))
    {
        return Err(bad("object id", p));
    }
    if let Some(p) = &source.lead.id {
        let dirty = match body.get(p) {
            Some(Value::Array(items)) => {
                items.iter().filter_map(id_text).any(|id| has_control(&id))
            }
            Some(v) => id_text(v).is_some_and(|id| has_control(&id)),
            None => false,
        };
        if dirty {
            return Err(bad("lead id", p));
        }
    }
    if let Some(p) = &source.lead.key
        && body
            .get(p)
            .and_then(scalar_text)
            .is_some_and(|k| has_control(k.trim()))
    {
        return Err(bad("lead key", p));
    }
    Ok(())
}

/// How a source's events find their leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leads {
    /// The body names the lead ids.
    Ids(Vec<LeadId>),
    /// The body names a key that the worker resolves through the mapping table or SprintHub.
    Key(String),
}

/// The custom object an event is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Object {
    /// The sender created it and sent its id.
    Id(ObjectId),
    /// sprintlink creates it from the event's fields, once its leads are known.
    Create(DefinitionId),
}

/// What one event maps to. `Err` carries the reason an operator reads on a parked event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped {
    pub object: Object,
    pub leads: Leads,
}

/// The JSON body of an object creation: each field's value (a reference that finds nothing,
/// or finds null, leaves its field out; a literal is sent as written).
pub fn object_fields(spec: &ObjectSpec, body: &Input) -> serde_json::Map<String, Value> {
    let mut out = serde_json::Map::new();
    for (alias, value) in &spec.fields {
        let v = match value {
            FieldValue::Reference(r) => body.get(r).filter(|v| !v.is_null()).cloned(),
            FieldValue::Literal(v) => Some(v.clone()),
        };
        if let Some(v) = v {
            out.insert(alias.clone(), v);
        }
    }
    out
}

/// Reads the event id: the configured pointer, else the scheme's delivery id (Stripe's is the
/// body's `id`), else the SHA-256 of the body, so identical bodies deduplicate.
pub fn event_id(
    source: &SourceConfig,
    body: &Input,
    raw: &[u8],
    delivery_id: Option<&str>,
) -> String {
    let stripe_id = ValueRef::Pointer("/id".into());
    let pointer = source
        .event_id
        .as_ref()
        .or((source.scheme == Scheme::Stripe).then_some(&stripe_id));
    pointer
        .and_then(|p| body.get(p))
        .and_then(scalar_text)
        .or_else(|| delivery_id.filter(|d| !d.is_empty()).map(str::to_string))
        .unwrap_or_else(|| format!("sha256:{}", hex::encode(Sha256::digest(raw))))
}

/// The event's type, when the source names where it is.
pub fn event_type(source: &SourceConfig, body: &Input) -> Option<String> {
    source
        .event_type
        .as_ref()
        .and_then(|p| body.get(p))
        .and_then(scalar_text)
}

/// Whether the source wants events of this type (an empty list accepts every type).
pub fn accepts(source: &SourceConfig, event_type: Option<&str>) -> bool {
    source.accept_types.is_empty()
        || event_type.is_some_and(|t| source.accept_types.iter().any(|a| a == t))
}

/// Where the mapping sends an event: its object id (when found) and what to do next.
pub fn plan(source: &SourceConfig, body: &Input) -> (Option<ObjectId>, crate::store::Plan) {
    use crate::store::Plan;
    match map(source, body) {
        Ok(m) => match (m.object, m.leads) {
            (Object::Id(o), Leads::Ids(ids)) => (Some(o), Plan::Links(ids)),
            (Object::Id(o), Leads::Key(_)) => (Some(o), Plan::Resolve),
            (Object::Create(definition_id), Leads::Ids(leads)) => (
                None,
                Plan::Create {
                    definition_id,
                    leads,
                },
            ),
            (Object::Create(_), Leads::Key(_)) => (None, Plan::Resolve),
        },
        Err(reason) => {
            // An object id over the cap is not kept: the reason says why the event is parked.
            let object_id = match source.object_rule() {
                ObjectRule::FromBody(p) => body
                    .get(p)
                    .and_then(id_text)
                    .filter(|id| id.len() <= MAX_ID_BYTES),
                ObjectRule::Create(_) => None,
            };
            (object_id.map(ObjectId::new), Plan::Parked(reason))
        }
    }
}

/// Maps the body to an object id and leads, or explains why it cannot.
pub fn map(source: &SourceConfig, body: &Input) -> Result<Mapped, String> {
    let object = match source.object_rule() {
        ObjectRule::FromBody(p) => {
            let object_id = body
                .get(p)
                .and_then(id_text)
                .ok_or_else(|| format!("object id not found at {p}"))?;
            if object_id.len() > MAX_ID_BYTES {
                return Err(format!(
                    "object id at {p} is longer than {MAX_ID_BYTES} bytes"
                ));
            }
            Object::Id(ObjectId::new(object_id))
        }
        ObjectRule::Create(spec) => Object::Create(spec.definition_id.clone()),
    };
    let lead = &source.lead;
    let leads = if let Some(p) = &lead.id {
        let ids = match body.get(p) {
            Some(Value::Array(items)) => {
                let ids: Option<Vec<String>> = items.iter().map(id_text).collect();
                ids.ok_or_else(|| format!("lead ids at {p} are not all ids"))?
            }
            Some(v) => vec![id_text(v).ok_or_else(|| format!("lead id at {p} is not an id"))?],
            None => return Err(format!("lead id not found at {p}")),
        };
        if ids.iter().any(|id| id.len() > MAX_ID_BYTES) {
            return Err(format!(
                "a lead id at {p} is longer than {MAX_ID_BYTES} bytes"
            ));
        }
        let mut ids = ids;
        ids.sort();
        ids.dedup();
        if ids.is_empty() {
            return Err(format!("lead id list at {p} is empty"));
        }
        if ids.len() > MAX_LEAD_IDS {
            return Err(format!(
                "{} lead ids at {p}; at most {MAX_LEAD_IDS} per event",
                ids.len()
            ));
        }
        Leads::Ids(ids.into_iter().map(LeadId::new).collect())
    } else if let Some(p) = &lead.key {
        let raw = body
            .get(p)
            .and_then(scalar_text)
            .ok_or_else(|| format!("lead key not found at {p}"))?;
        let key = normalize_key(&raw, lead.lookup, lead.field);
        if key.is_empty() {
            return Err(format!("lead key at {p} is empty"));
        }
        if key.len() > MAX_ID_BYTES {
            return Err(format!(
                "lead key at {p} is longer than {MAX_ID_BYTES} bytes"
            ));
        }
        Leads::Key(key)
    } else {
        return Err("source has no lead mapping".into());
    };
    Ok(Mapped { object, leads })
}

/// Canonical form of a lookup key: emails compare case-insensitively, phone numbers by digits.
pub fn normalize_key(raw: &str, lookup: Option<LookupKind>, field: Option<LeadField>) -> String {
    let raw = raw.trim();
    match (lookup, field) {
        (Some(LookupKind::Sprinthub), Some(LeadField::Whatsapp | LeadField::Mobile)) => digits(raw),
        _ if raw.contains('@') => raw.to_lowercase(),
        _ => raw.to_string(),
    }
}

/// The digits of a phone number, so `+55 (11) 9999-0000` equals `5511999990000`.
pub fn digits(s: &str) -> String {
    s.chars().filter(char::is_ascii_digit).collect()
}

/// An id as stored: integers and strings keep their text; anything else is not an id.
pub fn id_text(v: &Value) -> Option<String> {
    match v {
        Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
        _ => None,
    }
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// An id as SprintHub receives it: a JSON number when it is an integer or a string of digits,
/// otherwise the string as given.
pub fn id_json(id: &str) -> Value {
    let numeric = !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit());
    match id.parse::<u64>() {
        Ok(n) if numeric => Value::from(n),
        _ => match id.parse::<i64>() {
            Ok(n) if id.starts_with('-') && id[1..].bytes().all(|b| b.is_ascii_digit()) => {
                Value::from(n)
            }
            _ => Value::String(id.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LeadConfig;
    use serde_json::json;

    // The scenarios below read JSON bodies only: these wrap a body in an `Input`.
    fn map(s: &SourceConfig, v: &Value) -> Result<Mapped, String> {
        super::map(s, &Input::json(v.clone()))
    }
    fn event_id(s: &SourceConfig, v: &Value, raw: &[u8], d: Option<&str>) -> String {
        super::event_id(s, &Input::json(v.clone()), raw, d)
    }
    fn event_type(s: &SourceConfig, v: &Value) -> Option<String> {
        super::event_type(s, &Input::json(v.clone()))
    }
    fn check_storable(s: &SourceConfig, v: &Value) -> Result<(), Unstorable> {
        super::check_storable(s, &Input::json(v.clone()))
    }

    fn source(lead: LeadConfig) -> SourceConfig {
        SourceConfig {
            lead,
            ..SourceConfig::example("erp", "whsec_AAAA")
        }
    }

    fn by_id() -> SourceConfig {
        source(LeadConfig {
            id: Some("/data/lead_id".into()),
            ..Default::default()
        })
    }

    #[test]
    fn single_digit_string_and_array_lead_ids() {
        let s = by_id();
        let m = map(&s, &json!({"data": {"object_id": 123, "lead_id": 8473}})).unwrap();
        assert_eq!(
            m,
            Mapped {
                object: Object::Id("123".into()),
                leads: Leads::Ids(vec!["8473".into()])
            }
        );
        let m = map(
            &s,
            &json!({"data": {"object_id": "123", "lead_id": "8473"}}),
        )
        .unwrap();
        assert_eq!(m.leads, Leads::Ids(vec!["8473".into()]));
        let m = map(
            &s,
            &json!({"data": {"object_id": "obj-x", "lead_id": [2, "1", 2]}}),
        )
        .unwrap();
        assert_eq!(m.object, Object::Id("obj-x".into()));
        assert_eq!(m.leads, Leads::Ids(vec!["1".into(), "2".into()]));
    }

    #[test]
    fn missing_or_wrong_values_explain_themselves() {
        let s = by_id();
        assert!(
            map(&s, &json!({"data": {"lead_id": 1}}))
                .unwrap_err()
                .contains("object id not found at /data/object_id")
        );
        assert!(
            map(&s, &json!({"data": {"object_id": 1}}))
                .unwrap_err()
                .contains("lead id not found")
        );
        assert!(
            map(&s, &json!({"data": {"object_id": 1, "lead_id": []}}))
                .unwrap_err()
                .contains("empty")
        );
        assert!(map(&s, &json!({"data": {"object_id": 1, "lead_id": [1, null]}})).is_err());
        assert!(map(&s, &json!({"data": {"object_id": 1.5, "lead_id": 1}})).is_err());
        assert!(map(&s, &json!({"data": {"object_id": "  ", "lead_id": 1}})).is_err());
        assert!(map(&s, &json!([1, 2])).is_err());
    }

    #[test]
    fn keys_are_normalised() {
        let s = source(LeadConfig {
            key: Some("/c/email".into()),
            lookup: Some(LookupKind::Table),
            ..Default::default()
        });
        let m = map(
            &s,
            &json!({"data": {"object_id": 5}, "c": {"email": " Ann@Example.COM "}}),
        )
        .unwrap();
        assert_eq!(m.leads, Leads::Key("ann@example.com".into()));
        assert_eq!(
            normalize_key(
                "+55 (11) 9999-0000",
                Some(LookupKind::Sprinthub),
                Some(LeadField::Whatsapp)
            ),
            "551199990000"
        );
        assert_eq!(
            normalize_key("CUST-7", Some(LookupKind::Table), None),
            "CUST-7"
        );
    }

    #[test]
    fn event_id_falls_back_to_delivery_id_then_body_hash() {
        let s = by_id();
        assert_eq!(
            event_id(&s, &json!({"id": "evt_1"}), b"x", Some("d")),
            "evt_1"
        );
        assert_eq!(event_id(&s, &json!({"id": 42}), b"x", None), "42");
        assert_eq!(event_id(&s, &json!({}), b"x", Some("d")), "d");
        let h = event_id(&s, &json!({}), b"abc", None);
        assert_eq!(
            h,
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let mut stripe = by_id();
        stripe.scheme = Scheme::Stripe;
        stripe.event_id = None;
        assert_eq!(
            event_id(&stripe, &json!({"id": "evt_s"}), b"x", None),
            "evt_s"
        );
    }

    #[test]
    fn header_and_query_references_read_the_stored_request() {
        let mut s = by_id();
        s.event_id = Some("header:X-Delivery".into());
        s.event_type = Some("query:topic".into());
        s.object_id = Some("header:x-object".into());
        s.lead.id = Some("query:lead".into());
        let req = StoredRequest {
            body: br#"{"data": {}}"#.to_vec().into(),
            content_type: None,
            headers: [("x-delivery", "d-1"), ("x-object", "77")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .into(),
            query: [("topic", "object.created"), ("lead", "8")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .into(),
        };
        let input = Input::read(&req).unwrap();
        assert_eq!(super::event_id(&s, &input, b"x", None), "d-1");
        assert_eq!(
            super::event_type(&s, &input).as_deref(),
            Some("object.created")
        );
        let m = super::map(&s, &input).unwrap();
        assert_eq!(m.object, Object::Id("77".into()));
        assert_eq!(m.leads, Leads::Ids(vec!["8".into()]));
        // Nothing found: as a missing pointer, with the reference named.
        let bare = Input::json(json!({}));
        assert_eq!(
            super::map(&s, &bare).unwrap_err(),
            "object id not found at header:x-object"
        );
        assert!(super::event_id(&s, &bare, b"abc", None).starts_with("sha256:"));
        // A form body reads the same way as JSON.
        let form = StoredRequest {
            body: b"data[object_id]=5&data[lead_id][]=1&data[lead_id][]=2"
                .to_vec()
                .into(),
            content_type: Some("application/x-www-form-urlencoded".into()),
            ..Default::default()
        };
        let m = super::map(&by_id(), &Input::read(&form).unwrap()).unwrap();
        assert_eq!(m.object, Object::Id("5".into()));
        assert_eq!(m.leads, Leads::Ids(vec!["1".into(), "2".into()]));
    }

    #[test]
    fn accept_types_filter() {
        let s = by_id();
        assert!(accepts(&s, Some("object.created")));
        assert!(!accepts(&s, Some("object.deleted")));
        assert!(!accepts(&s, None));
        let mut all = by_id();
        all.accept_types.clear();
        assert!(accepts(&all, None));
        assert_eq!(
            event_type(&s, &json!({"type": "object.created"})).as_deref(),
            Some("object.created")
        );
    }

    #[test]
    fn oversized_ids_and_keys_and_too_many_leads_are_refused() {
        let s = by_id();
        let long = "x".repeat(257);
        let e = map(&s, &json!({"data": {"object_id": long, "lead_id": 1}})).unwrap_err();
        assert!(e.contains("256"), "{e}");
        assert!(!e.contains(&long), "the value is not echoed: {e}");
        let e = map(&s, &json!({"data": {"object_id": 1, "lead_id": long}})).unwrap_err();
        assert!(e.contains("256"), "{e}");
        let e = map(&s, &json!({"data": {"object_id": 1, "lead_id": [1, long]}})).unwrap_err();
        assert!(e.contains("256"), "{e}");
        let many: Vec<u64> = (0..101).collect();
        let e = map(&s, &json!({"data": {"object_id": 1, "lead_id": many}})).unwrap_err();
        assert!(e.contains("100"), "{e}");
        let hundred: Vec<u64> = (0..100).collect();
        assert!(map(&s, &json!({"data": {"object_id": 1, "lead_id": hundred}})).is_ok());
        let at_cap = "y".repeat(256);
        assert!(map(&s, &json!({"data": {"object_id": at_cap, "lead_id": 1}})).is_ok());
        let keyed = source(LeadConfig {
            key: Some("/c/email".into()),
            lookup: Some(LookupKind::Table),
            ..Default::default()
        });
        let e = map(
            &keyed,
            &json!({"data": {"object_id": 5}, "c": {"email": long}}),
        )
        .unwrap_err();
        assert!(e.contains("256"), "{e}");
    }

    #[test]
    fn event_ids_over_the_cap_or_with_control_characters_are_unstorable() {
        assert!(check_event_id(&"e".repeat(256)).is_ok());
        assert_eq!(
            check_event_id(&"e".repeat(257)).unwrap_err().code,
            UnstorableValue::EventId
        );
        for bad in ["a\u{0}b", "a\nb", "\u{7f}", "x\u{85}"] {
            assert_eq!(
                check_event_id(bad).unwrap_err().code,
                UnstorableValue::EventId,
                "{bad:?}"
            );
        }
        assert!(check_event_id("évt-ü_1 with spaces").is_ok());
    }

    #[test]
    fn control_characters_in_ids_keys_and_types_are_unstorable() {
        let s = by_id();
        let ok = json!({"type": "object.created", "data": {"object_id": 1, "lead_id": [1, "2"]}});
        assert!(check_storable(&s, &ok).is_ok());
        let obj = json!({"data": {"object_id": "o\u{0}", "lead_id": 1}});
        assert_eq!(
            check_storable(&s, &obj).unwrap_err().code,
            UnstorableValue::Id
        );
        let lead = json!({"data": {"object_id": 1, "lead_id": [1, "l\u{1}"]}});
        assert_eq!(
            check_storable(&s, &lead).unwrap_err().code,
            UnstorableValue::Id
        );
        let one = json!({"data": {"object_id": 1, "lead_id": "l\u{0}"}});
        assert_eq!(
            check_storable(&s, &one).unwrap_err().code,
            UnstorableValue::Id
        );
        let ty = json!({"type": "t\u{0}", "data": {"object_id": 1, "lead_id": 1}});
        assert_eq!(
            check_storable(&s, &ty).unwrap_err().code,
            UnstorableValue::EventType
        );
        let long_ty = json!({"type": "t".repeat(257), "data": {"object_id": 1, "lead_id": 1}});
        assert_eq!(
            check_storable(&s, &long_ty).unwrap_err().code,
            UnstorableValue::EventType
        );
        // Too long is not unstorable: map() parks it.
        let long = json!({"data": {"object_id": "o".repeat(300), "lead_id": 1}});
        assert!(check_storable(&s, &long).is_ok());
        let keyed = source(LeadConfig {
            key: Some("/c/email".into()),
            lookup: Some(LookupKind::Table),
            ..Default::default()
        });
        let k = json!({"data": {"object_id": 1}, "c": {"email": "a\u{0}@b"}});
        assert_eq!(
            check_storable(&keyed, &k).unwrap_err().code,
            UnstorableValue::Id
        );
        // Surrounding whitespace is trimmed as before, not refused.
        let k = json!({"data": {"object_id": 1}, "c": {"email": " a@b\n"}});
        assert!(check_storable(&keyed, &k).is_ok());
    }

    #[test]
    fn ids_go_out_as_numbers_when_they_are_digits() {
        assert_eq!(id_json("123"), json!(123));
        assert_eq!(id_json("-4"), json!(-4));
        assert_eq!(id_json("abc-1"), json!("abc-1"));
        assert_eq!(id_json("12a"), json!("12a"));
        assert_eq!(
            id_json("99999999999999999999999"),
            json!("99999999999999999999999")
        );
    }
}

#[cfg(test)]
mod fuzz {
    //! Property tests: mapping arbitrary JSON with arbitrary pointers never panics, and what
    //! it returns is well formed.
    use super::*;
    use crate::config::{LeadConfig, Secret};
    use proptest::prelude::*;

    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            ".{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(6, 64, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map("[a-z_0-9~/]{0,6}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn source(object: String, lead: String, key: bool) -> SourceConfig {
        SourceConfig {
            name: "s".into(),
            scheme: Scheme::Github,
            secrets: vec![Secret::new("x")],
            event_id: Some(lead.as_str().into()),
            event_type: Some(object.as_str().into()),
            accept_types: vec![],
            object_id: Some(object.as_str().into()),
            object: None,
            lead: if key {
                LeadConfig {
                    key: Some(lead.as_str().into()),
                    lookup: Some(LookupKind::Table),
                    ..Default::default()
                }
            } else {
                LeadConfig {
                    id: Some(lead.as_str().into()),
                    ..Default::default()
                }
            },
            ..SourceConfig::example("s", "x")
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn mapping_never_panics_and_returns_clean_ids(
            body in json(),
            object in "(/[a-z_0-9~]{0,4}){0,3}",
            lead in "(/[a-z_0-9~]{0,4}){0,3}",
            key in any::<bool>(),
        ) {
            let s = source(object, lead, key);
            let body = Input::json(body);
            let _ = event_type(&s, &body);
            let id = event_id(&s, &body, b"raw", None);
            prop_assert!(!id.is_empty());
            if let Ok(m) = map(&s, &body) {
                let Object::Id(object_id) = &m.object else {
                    panic!("a source with object_id maps to an id");
                };
                prop_assert!(!object_id.as_str().trim().is_empty());
                match m.leads {
                    Leads::Ids(ids) => prop_assert!(!ids.is_empty() && ids.iter().all(|i| !i.as_str().is_empty())),
                    Leads::Key(k) => prop_assert!(!k.is_empty()),
                }
            }
        }

        #[test]
        fn ids_survive_the_trip_to_json(id in prop_oneof![".{1,30}", "-?[0-9]{1,22}"]) {
            let v = id_json(&id);
            match v {
                // Digit strings go out as the number they spell ("0123" is 123).
                Value::Number(n) => prop_assert_eq!(n.to_string().parse::<i128>().ok(), id.parse::<i128>().ok()),
                Value::String(s) => prop_assert_eq!(s, id),
                _ => prop_assert!(false),
            }
        }
    }
}
