//! Typed, bounded reading of the header JSON. Nothing here builds a `serde_json::Value` tree of
//! the whole header (about ten times the text): fields are read straight into compact structs,
//! unknown keys are skipped without allocating, and a field of the wrong JSON type is recorded
//! (not raised) so that the error can name its tensor even when `name` comes later in the object.

use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use super::limits::{MAX_ENCODING_VALUES, MAX_RANK};

/// One JSON value, read shallowly: scalars are kept, arrays and objects are skipped.
#[derive(Debug, Clone, PartialEq)]
pub enum Shallow {
    Null,
    Bool(bool),
    Uint(u64),
    Int(i64),
    Float(f64),
    Str(String),
    Array,
    Object,
}

impl Shallow {
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Shallow::Uint(v) => Some(*v),
            _ => None,
        }
    }
    pub fn from_value(v: &Value) -> Shallow {
        match v {
            Value::Null => Shallow::Null,
            Value::Bool(b) => Shallow::Bool(*b),
            Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
                (Some(u), _, _) => Shallow::Uint(u),
                (None, Some(i), _) => Shallow::Int(i),
                (_, _, f) => Shallow::Float(f.unwrap_or(f64::NAN)),
            },
            Value::String(s) => Shallow::Str(s.clone()),
            Value::Array(_) => Shallow::Array,
            Value::Object(_) => Shallow::Object,
        }
    }
}

/// How an error message shows a value it refuses: numbers as integers where they are integers
/// (2^64 prints as 18446744073709551616, not as a float), strings quoted and cut short.
impl fmt::Display for Shallow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Shallow::Null => f.write_str("null"),
            Shallow::Bool(b) => write!(f, "{b}"),
            Shallow::Uint(v) => write!(f, "{v}"),
            Shallow::Int(v) => write!(f, "{v}"),
            // JSON integers beyond u64 arrive as the nearest f64; print its exact integer value.
            Shallow::Float(v) if v.is_finite() && v.fract() == 0.0 => write!(f, "{v:.0}"),
            Shallow::Float(v) => write!(f, "{v}"),
            Shallow::Str(s) => {
                let short: String = s.chars().take(40).collect();
                let more = if short.len() < s.len() { "..." } else { "" };
                write!(f, "{:?}", format!("{short}{more}"))
            }
            Shallow::Array => f.write_str("an array"),
            Shallow::Object => f.write_str("an object"),
        }
    }
}

/// A field that must have one JSON type: its value, or what stood there instead.
#[derive(Debug, Clone, PartialEq)]
pub enum Field<T> {
    Got(T),
    Not(Shallow),
}

/// Visitor methods for the scalar JSON types, each giving `$wrap(the value as a Shallow)`.
macro_rules! scalars_as {
    ($wrap:expr) => {
        fn visit_unit<E: serde::de::Error>(self) -> std::result::Result<Self::Value, E> {
            Ok($wrap($crate::format::json::Shallow::Null))
        }
        fn visit_bool<E: serde::de::Error>(self, v: bool) -> std::result::Result<Self::Value, E> {
            Ok($wrap($crate::format::json::Shallow::Bool(v)))
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<Self::Value, E> {
            Ok($wrap($crate::format::json::Shallow::Uint(v)))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<Self::Value, E> {
            Ok($wrap($crate::format::json::Shallow::Int(v)))
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> std::result::Result<Self::Value, E> {
            Ok($wrap($crate::format::json::Shallow::Float(v)))
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Self::Value, E> {
            Ok($wrap($crate::format::json::Shallow::Str(v.to_string())))
        }
    };
}
pub(crate) use scalars_as;

/// `visit_seq` for a visitor that wants an object: the array is skipped, given as `$wrap(Array)`.
macro_rules! array_as {
    ($wrap:expr) => {
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> std::result::Result<Self::Value, A::Error> {
            while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
            Ok($wrap($crate::format::json::Shallow::Array))
        }
    };
}
pub(crate) use array_as;

/// `visit_map` for a visitor that wants an array: the object is skipped, given as `$wrap(Object)`.
macro_rules! object_as {
    ($wrap:expr) => {
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> std::result::Result<Self::Value, A::Error> {
            while map
                .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                .is_some()
            {}
            Ok($wrap($crate::format::json::Shallow::Object))
        }
    };
}
pub(crate) use object_as;

struct ShallowVisitor;

impl<'de> Visitor<'de> for ShallowVisitor {
    type Value = Shallow;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E>(self) -> Result<Shallow, E> {
        Ok(Shallow::Null)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Shallow, E> {
        Ok(Shallow::Bool(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Shallow, E> {
        Ok(Shallow::Uint(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Shallow, E> {
        Ok(if v >= 0 {
            Shallow::Uint(v as u64)
        } else {
            Shallow::Int(v)
        })
    }
    fn visit_f64<E>(self, v: f64) -> Result<Shallow, E> {
        Ok(Shallow::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Shallow, E> {
        Ok(Shallow::Str(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Shallow, E> {
        Ok(Shallow::Str(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Shallow, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Shallow::Array)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Shallow, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Shallow::Object)
    }
}

impl<'de> de::Deserialize<'de> for Shallow {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ShallowVisitor)
    }
}

/// A `shape` field: the first `MAX_RANK + 1` dimensions (enough to refuse a longer one) and the
/// rank, or what stood there instead of an array.
#[derive(Debug, Clone, PartialEq)]
pub enum ShapeField {
    Dims { dims: Vec<Shallow>, rank: usize },
    NotArray(Shallow),
}

impl<'de> de::Deserialize<'de> for ShapeField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ShapeField;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a shape")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ShapeField, A::Error> {
                let (mut dims, mut rank) = (Vec::new(), 0usize);
                while let Some(d) = seq.next_element::<Shallow>()? {
                    if rank <= MAX_RANK {
                        dims.push(d);
                    }
                    rank += 1;
                }
                Ok(ShapeField::Dims { dims, rank })
            }
            object_as!(ShapeField::NotArray);
            scalars_as!(ShapeField::NotArray);
        }
        d.deserialize_any(V)
    }
}

/// Objects: `visit` gets each key in turn and must read its value. A repeated key among `known`
/// is refused (a reader must not pick one of two meanings); other keys are the visitor's concern.
pub fn read_object<'de, A: MapAccess<'de>>(
    mut map: A,
    what: &str,
    known: &[&str],
    mut visit: impl FnMut(&str, &mut A) -> Result<(), A::Error>,
) -> Result<(), A::Error> {
    let mut seen = 0u64;
    while let Some(key) = map.next_key::<String>()? {
        if let Some(i) = known.iter().position(|k| *k == key) {
            if seen & (1 << i) != 0 {
                return Err(de::Error::custom(format!(
                    "{what} has the key '{key}' twice"
                )));
            }
            seen |= 1 << i;
        }
        visit(&key, &mut map)?;
    }
    Ok(())
}

/// A JSON value of an `encoding` object, built as a `Value` (encodings may carry parameters this
/// reader does not know, which listing tools show) but with a budget of `MAX_ENCODING_VALUES`
/// values per encoding, so that a hostile object cannot amplify into a huge tree.
pub struct BoundedValue<'b> {
    pub budget: &'b Cell<usize>,
}

impl<'b> BoundedValue<'b> {
    fn spend<E: de::Error>(&self) -> Result<(), E> {
        match self.budget.get().checked_sub(1) {
            Some(left) => {
                self.budget.set(left);
                Ok(())
            }
            None => Err(E::custom(format!(
                "the encoding object holds more than {MAX_ENCODING_VALUES} JSON values"
            ))),
        }
    }
}

impl<'de> DeserializeSeed<'de> for BoundedValue<'_> {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for BoundedValue<'_> {
    type Value = Value;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.spend()?;
        Ok(Value::Null)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        self.spend()?;
        Ok(Value::Bool(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        self.spend()?;
        Ok(Value::from(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        self.spend()?;
        Ok(Value::from(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        self.spend()?;
        Ok(Value::from(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        self.spend()?;
        Ok(Value::from(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.spend()?;
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(BoundedValue {
            budget: self.budget,
        })? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Value, A::Error> {
        self.spend()?;
        let budget = self.budget;
        let mut out = Map::new();
        read_object(map, "an object of the encoding", &[], |key, map| {
            let v = map.next_value_seed(BoundedValue { budget })?;
            if out.insert(key.to_string(), v).is_some() {
                return Err(de::Error::custom(format!(
                    "an object of the encoding has the key '{key}' twice"
                )));
            }
            Ok(())
        })?;
        Ok(Value::Object(out))
    }
}
