//! Bounded nesting for every decoder of stored bytes.
//!
//! serde's derived code recurses once per level of nesting, and postcard, unlike RON and
//! serde_json, has no limit of its own: a 100 KB record of a recursive type nested 100,000
//! deep overflows any thread's stack, which aborts the process (Rust cannot catch a stack
//! overflow). A save file is untrusted input, so every decoder here runs through
//! [`Bounded`], which counts levels and refuses to go deeper than [`MAX_DEPTH`] with a
//! typed error ([`StorageError::NestingTooDeep`](crate::StorageError::NestingTooDeep))
//! long before the stack is at risk: the limit holds on a thread with a 2 MiB stack (Bevy's
//! task pool threads, a game's main thread) in a debug build.
//!
//! What counts as a level: each `Some`, newtype struct, sequence, tuple, map, struct and enum
//! variant the value is made of (a plain struct of scalars is 1 level; `Vec<Vec<u8>>` is 2;
//! a linked list of `Option<Box<Node>>` spends 2 levels per node). Saves count the same way
//! with the same limit (see [`BoundedValue`]), so a save that succeeds can always be loaded
//! again: a value nested deeper than the limit is refused when it is saved, never written.

use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, Visitor};
use serde::ser::{self, Serialize, Serializer};

/// How deeply a stored value may nest (see the [module docs](self) for what a level is):
/// 128, as serde_json's and RON's own limits. Game data rarely nests past 20.
pub const MAX_DEPTH: usize = 128;

/// The nesting budget of one encode or decode, shared by its wrappers.
#[derive(Debug)]
pub struct DepthBudget {
    limit: usize,
    depth: Cell<usize>,
    exceeded: Cell<bool>,
}

impl DepthBudget {
    /// A budget of `limit` levels.
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            depth: Cell::new(0),
            exceeded: Cell::new(false),
        }
    }

    /// The number of levels allowed.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// True once a value went deeper than the limit (the encode or decode then failed; this
    /// tells that failure apart from others even when the format drops the message, as
    /// postcard's errors do).
    pub fn exceeded(&self) -> bool {
        self.exceeded.get()
    }

    fn message(&self) -> impl fmt::Display + '_ {
        struct Message(usize);
        impl fmt::Display for Message {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "the value nests deeper than {} levels", self.0)
            }
        }
        Message(self.limit)
    }

    fn enter_de<E: de::Error>(&self) -> Result<(), E> {
        let depth = self.depth.get();
        if depth >= self.limit {
            self.exceeded.set(true);
            return Err(E::custom(self.message()));
        }
        self.depth.set(depth + 1);
        Ok(())
    }

    #[inline(always)]
    fn enter_ser<E: ser::Error>(&self) -> Result<(), E> {
        let depth = self.depth.get();
        if depth >= self.limit {
            return Err(self.too_deep_ser());
        }
        self.depth.set(depth + 1);
        Ok(())
    }

    /// The refusal of [`enter_ser`](Self::enter_ser), out of line so that the check itself
    /// stays a compare and a store where it is inlined, once per compound of a saved value.
    #[cold]
    #[inline(never)]
    fn too_deep_ser<E: ser::Error>(&self) -> E {
        self.exceeded.set(true);
        E::custom(self.message())
    }

    #[inline(always)]
    fn leave(&self) {
        self.depth.set(self.depth.get().saturating_sub(1));
    }

    /// Runs `inner` one level down, refusing when the budget is spent.
    fn nested_de<T, E: de::Error>(&self, inner: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
        self.enter_de::<E>()?;
        let result = inner();
        self.leave();
        result
    }

    #[inline(always)]
    fn nested_ser<T, E: ser::Error>(&self, inner: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
        self.enter_ser::<E>()?;
        let result = inner();
        self.leave();
        result
    }
}

/// A serde deserializer, visitor, seed or access wrapped so that everything it reaches is
/// depth-counted against one [`DepthBudget`]. Start with [`Bounded::seed`].
pub struct Bounded<'b, T> {
    inner: T,
    budget: &'b DepthBudget,
}

impl<'b, T> Bounded<'b, T> {
    /// Wraps a [`DeserializeSeed`] (for example `PhantomData::<MyType>`, or a reflection
    /// seed) so that the value it reads is depth-limited.
    pub fn seed(inner: T, budget: &'b DepthBudget) -> Self {
        Self { inner, budget }
    }

    fn wrap<U>(&self, inner: U) -> Bounded<'b, U> {
        Bounded {
            inner,
            budget: self.budget,
        }
    }
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Bounded<'_, S> {
    type Value = S::Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<S::Value, D::Error> {
        let d = self.wrap(deserializer);
        self.inner.deserialize(d)
    }
}

macro_rules! forward_deserialize {
    ($($method:ident($($arg:ident: $ty:ty),*)),* $(,)?) => {
        $(
            fn $method<V: Visitor<'de>>(self $(, $arg: $ty)*, visitor: V) -> Result<V::Value, D::Error> {
                let visitor = self.wrap(visitor);
                self.inner.$method($($arg,)* visitor)
            }
        )*
    };
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Bounded<'_, D> {
    type Error = D::Error;

    forward_deserialize!(
        deserialize_any(),
        deserialize_bool(),
        deserialize_i8(),
        deserialize_i16(),
        deserialize_i32(),
        deserialize_i64(),
        deserialize_i128(),
        deserialize_u8(),
        deserialize_u16(),
        deserialize_u32(),
        deserialize_u64(),
        deserialize_u128(),
        deserialize_f32(),
        deserialize_f64(),
        deserialize_char(),
        deserialize_str(),
        deserialize_string(),
        deserialize_bytes(),
        deserialize_byte_buf(),
        deserialize_option(),
        deserialize_unit(),
        deserialize_unit_struct(name: &'static str),
        deserialize_newtype_struct(name: &'static str),
        deserialize_seq(),
        deserialize_tuple(len: usize),
        deserialize_tuple_struct(name: &'static str, len: usize),
        deserialize_map(),
        deserialize_struct(name: &'static str, fields: &'static [&'static str]),
        deserialize_enum(name: &'static str, variants: &'static [&'static str]),
        deserialize_identifier(),
        deserialize_ignored_any(),
    );

    fn is_human_readable(&self) -> bool {
        self.inner.is_human_readable()
    }
}

macro_rules! forward_visit {
    ($($method:ident($ty:ty)),* $(,)?) => {
        $(
            fn $method<E: de::Error>(self, v: $ty) -> Result<V::Value, E> {
                self.inner.$method(v)
            }
        )*
    };
}

impl<'de, V: Visitor<'de>> Visitor<'de> for Bounded<'_, V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.expecting(f)
    }

    forward_visit!(
        visit_bool(bool),
        visit_i8(i8),
        visit_i16(i16),
        visit_i32(i32),
        visit_i64(i64),
        visit_i128(i128),
        visit_u8(u8),
        visit_u16(u16),
        visit_u32(u32),
        visit_u64(u64),
        visit_u128(u128),
        visit_f32(f32),
        visit_f64(f64),
        visit_char(char),
        visit_str(&str),
        visit_borrowed_str(&'de str),
        visit_string(String),
        visit_bytes(&[u8]),
        visit_borrowed_bytes(&'de [u8]),
        visit_byte_buf(Vec<u8>),
    );

    fn visit_none<E: de::Error>(self) -> Result<V::Value, E> {
        self.inner.visit_none()
    }

    fn visit_unit<E: de::Error>(self) -> Result<V::Value, E> {
        self.inner.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
        let d = self.wrap(d);
        self.budget.nested_de(|| self.inner.visit_some(d))
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
        let d = self.wrap(d);
        self.budget.nested_de(|| self.inner.visit_newtype_struct(d))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<V::Value, A::Error> {
        let seq = self.wrap(seq);
        self.budget.nested_de(|| self.inner.visit_seq(seq))
    }

    fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        let map = self.wrap(map);
        self.budget.nested_de(|| self.inner.visit_map(map))
    }

    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<V::Value, A::Error> {
        let data = self.wrap(data);
        self.budget.nested_de(|| self.inner.visit_enum(data))
    }
}

impl<'de, A: de::SeqAccess<'de>> de::SeqAccess<'de> for Bounded<'_, A> {
    type Error = A::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, A::Error> {
        let seed = self.wrap(seed);
        self.inner.next_element_seed(seed)
    }

    fn size_hint(&self) -> Option<usize> {
        self.inner.size_hint()
    }
}

impl<'de, A: de::MapAccess<'de>> de::MapAccess<'de> for Bounded<'_, A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        let seed = self.wrap(seed);
        self.inner.next_key_seed(seed)
    }

    fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, A::Error> {
        let seed = self.wrap(seed);
        self.inner.next_value_seed(seed)
    }

    fn size_hint(&self) -> Option<usize> {
        self.inner.size_hint()
    }
}

impl<'de, 'b, A: de::EnumAccess<'de>> de::EnumAccess<'de> for Bounded<'b, A> {
    type Error = A::Error;
    type Variant = Bounded<'b, A::Variant>;

    fn variant_seed<T: DeserializeSeed<'de>>(
        self,
        seed: T,
    ) -> Result<(T::Value, Self::Variant), A::Error> {
        let seed = self.wrap(seed);
        let budget = self.budget;
        self.inner
            .variant_seed(seed)
            .map(|(value, variant)| (value, Bounded::seed(variant, budget)))
    }
}

impl<'de, A: de::VariantAccess<'de>> de::VariantAccess<'de> for Bounded<'_, A> {
    type Error = A::Error;

    fn unit_variant(self) -> Result<(), A::Error> {
        self.inner.unit_variant()
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, A::Error> {
        let seed = self.wrap(seed);
        self.inner.newtype_variant_seed(seed)
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, A::Error> {
        let visitor = self.wrap(visitor);
        self.inner.tuple_variant(len, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, A::Error> {
        let visitor = self.wrap(visitor);
        self.inner.struct_variant(fields, visitor)
    }
}

/// A value to serialize with the same depth count as [`Bounded`] decodes with: saving a value
/// nested deeper than the budget fails instead of writing a record no load would accept.
///
/// `RON` is true for a value written by RON's serializer with its default options (and
/// nothing else): strings RON would write unchanged between quotes are then handed to it
/// already quoted, which spares its escaping of every character (see `plain_ron_string`).
/// A type parameter rather than a flag of the budget, so that other formats' strings do not
/// even test it.
pub struct BoundedValue<'a, 'b, T: ?Sized, const RON: bool = false> {
    value: &'a T,
    budget: &'b DepthBudget,
}

impl<'a, 'b, T: ?Sized> BoundedValue<'a, 'b, T> {
    /// Wraps `value` for serialization against `budget`.
    #[inline(always)]
    pub fn new(value: &'a T, budget: &'b DepthBudget) -> Self {
        Self { value, budget }
    }
}

impl<'a, 'b, T: ?Sized> BoundedValue<'a, 'b, T, true> {
    /// Wraps `value` for serialization against `budget` by RON's serializer with its default
    /// options (`ron::Options::default()`), and nothing else.
    pub(crate) fn for_ron_serializer(value: &'a T, budget: &'b DepthBudget) -> Self {
        Self { value, budget }
    }
}

impl<T: Serialize + ?Sized, const RON: bool> Serialize for BoundedValue<'_, '_, T, RON> {
    #[inline(always)]
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.value.serialize(BoundedSerializer::<S, RON> {
            inner: serializer,
            budget: self.budget,
        })
    }
}

/// The serializer side of [`BoundedValue`]; also wraps each compound serializer, which
/// gives the level back in its `end`.
struct BoundedSerializer<'b, S, const RON: bool> {
    inner: S,
    budget: &'b DepthBudget,
}

impl<'b, S, const RON: bool> BoundedSerializer<'b, S, RON> {
    #[inline(always)]
    fn value<'a, T: ?Sized>(&self, value: &'a T) -> BoundedValue<'a, 'b, T, RON> {
        BoundedValue {
            value,
            budget: self.budget,
        }
    }
}

/// The name under which RON's serializer takes a raw RON value (`ron::value::RawValue`
/// serializes as a newtype struct of this name, which RON writes out as it is). A RON release
/// that changed it would make [`plain_ron_string`]s come out as `("...")`: the test
/// `ron_strings_are_written_as_ron_writes_them` compares with RON's own output.
const RON_RAW_VALUE: &str = "$ron::private::RawValue";

/// True when RON (default options) writes `s` unchanged between double quotes: every
/// character printable ASCII, none that `char::escape_debug` escapes (`"`, `'`, `\`).
fn plain_ron_string(s: &str) -> bool {
    s.bytes()
        .all(|b| (0x20..=0x7e).contains(&b) && b != b'"' && b != b'\'' && b != b'\\')
}

/// A string for RON's serializer: see [`BoundedSerializer::serialize_str`].
#[inline(never)]
fn ron_str<S: Serializer>(inner: S, budget: &DepthBudget, v: &str) -> Result<S::Ok, S::Error> {
    if budget.depth.get() < budget.limit / 2 && plain_ron_string(v) {
        let mut quoted = String::with_capacity(v.len() + 2);
        quoted.push('"');
        quoted.push_str(v);
        quoted.push('"');
        return inner.serialize_newtype_struct(RON_RAW_VALUE, quoted.as_str());
    }
    inner.serialize_str(v)
}

/// Opens a compound one level down; its `end` leaves the level.
#[inline(always)]
fn open<'b, C, E: ser::Error, const RON: bool>(
    budget: &'b DepthBudget,
    open: impl FnOnce() -> Result<C, E>,
) -> Result<BoundedSerializer<'b, C, RON>, E> {
    budget.enter_ser::<E>()?;
    open().map(|inner| BoundedSerializer { inner, budget })
}

macro_rules! forward_serialize {
    ($($method:ident($ty:ty)),* $(,)?) => {
        $(
            #[inline(always)]
            fn $method(self, v: $ty) -> Result<S::Ok, S::Error> {
                self.inner.$method(v)
            }
        )*
    };
}

impl<'b, S: Serializer, const RON: bool> Serializer for BoundedSerializer<'b, S, RON> {
    type Ok = S::Ok;
    type Error = S::Error;
    type SerializeSeq = BoundedSerializer<'b, S::SerializeSeq, RON>;
    type SerializeTuple = BoundedSerializer<'b, S::SerializeTuple, RON>;
    type SerializeTupleStruct = BoundedSerializer<'b, S::SerializeTupleStruct, RON>;
    type SerializeTupleVariant = BoundedSerializer<'b, S::SerializeTupleVariant, RON>;
    type SerializeMap = BoundedSerializer<'b, S::SerializeMap, RON>;
    type SerializeStruct = BoundedSerializer<'b, S::SerializeStruct, RON>;
    type SerializeStructVariant = BoundedSerializer<'b, S::SerializeStructVariant, RON>;

    forward_serialize!(
        serialize_bool(bool),
        serialize_i8(i8),
        serialize_i16(i16),
        serialize_i32(i32),
        serialize_i64(i64),
        serialize_i128(i128),
        serialize_u8(u8),
        serialize_u16(u16),
        serialize_u32(u32),
        serialize_u64(u64),
        serialize_u128(u128),
        serialize_f32(f32),
        serialize_f64(f64),
        serialize_char(char),
        serialize_bytes(&[u8]),
        serialize_unit_struct(&'static str),
    );

    #[inline(always)]
    fn serialize_str(self, v: &str) -> Result<S::Ok, S::Error> {
        // RON escapes a string one character at a time (`char::escape_debug`, about 14 ns a
        // character: 2.8 us for 200 of them on the project's machine, more than LZ4 and
        // the Redis or SQLite write of the record). One it would write unchanged goes to it
        // as a raw RON value instead, the same bytes. RON counts the raw value as one more
        // level of its own limit (128, as ours), so only well above it.
        // Out of line, and only for RON (`RON` is a constant): other formats' strings go
        // straight to their serializer.
        if RON {
            return ron_str(self.inner, self.budget, v);
        }
        self.inner.serialize_str(v)
    }

    #[inline(always)]
    fn serialize_none(self) -> Result<S::Ok, S::Error> {
        self.inner.serialize_none()
    }

    #[inline(always)]
    fn serialize_unit(self) -> Result<S::Ok, S::Error> {
        self.inner.serialize_unit()
    }

    #[inline(always)]
    fn serialize_unit_variant(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
    ) -> Result<S::Ok, S::Error> {
        // A decoder visits an enum one level down even when the variant carries nothing.
        self.budget
            .nested_ser(|| self.inner.serialize_unit_variant(name, index, variant))
    }

    #[inline(always)]
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<S::Ok, S::Error> {
        let value = self.value(value);
        self.budget.nested_ser(|| self.inner.serialize_some(&value))
    }

    #[inline(always)]
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        value: &T,
    ) -> Result<S::Ok, S::Error> {
        let value = self.value(value);
        self.budget
            .nested_ser(|| self.inner.serialize_newtype_struct(name, &value))
    }

    #[inline(always)]
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<S::Ok, S::Error> {
        let value = self.value(value);
        // One level, the enum: a decoder reads the newtype's content straight from the
        // variant.
        self.budget.nested_ser(|| {
            self.inner
                .serialize_newtype_variant(name, index, variant, &value)
        })
    }

    #[inline(always)]
    fn serialize_seq(self, len: Option<usize>) -> Result<Self::SerializeSeq, S::Error> {
        open(self.budget, move || self.inner.serialize_seq(len))
    }

    #[inline(always)]
    fn serialize_tuple(self, len: usize) -> Result<Self::SerializeTuple, S::Error> {
        open(self.budget, move || self.inner.serialize_tuple(len))
    }

    #[inline(always)]
    fn serialize_tuple_struct(
        self,
        name: &'static str,
        len: usize,
    ) -> Result<Self::SerializeTupleStruct, S::Error> {
        open(self.budget, move || {
            self.inner.serialize_tuple_struct(name, len)
        })
    }

    #[inline(always)]
    fn serialize_tuple_variant(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self::SerializeTupleVariant, S::Error> {
        // The enum and the tuple inside it: two levels, given back by `end_variant`.
        self.budget.enter_ser::<S::Error>()?;
        open(self.budget, move || {
            self.inner
                .serialize_tuple_variant(name, index, variant, len)
        })
    }

    #[inline(always)]
    fn serialize_map(self, len: Option<usize>) -> Result<Self::SerializeMap, S::Error> {
        open(self.budget, move || self.inner.serialize_map(len))
    }

    #[inline(always)]
    fn serialize_struct(
        self,
        name: &'static str,
        len: usize,
    ) -> Result<Self::SerializeStruct, S::Error> {
        open(self.budget, move || self.inner.serialize_struct(name, len))
    }

    #[inline(always)]
    fn serialize_struct_variant(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self::SerializeStructVariant, S::Error> {
        self.budget.enter_ser::<S::Error>()?;
        open(self.budget, move || {
            self.inner
                .serialize_struct_variant(name, index, variant, len)
        })
    }

    #[inline(always)]
    fn is_human_readable(&self) -> bool {
        self.inner.is_human_readable()
    }
}

impl<S, const RON: bool> BoundedSerializer<'_, S, RON> {
    /// The `end` of a tuple or struct variant: it gives back two levels, the enum's and the
    /// compound's.
    #[inline(always)]
    fn end_compound(&self) {
        self.budget.leave();
    }

    #[inline(always)]
    fn end_variant(&self) {
        self.budget.leave();
        self.budget.leave();
    }
}

/// The compounds whose elements are values: each element is bounded, and `end` gives the
/// compound's level back (two for a variant, see `end_variant`).
macro_rules! bounded_elements {
    ($($trait:ident :: $method:ident, $end:ident);* $(;)?) => {$(
        impl<S: ser::$trait, const RON: bool> ser::$trait for BoundedSerializer<'_, S, RON> {
            type Ok = S::Ok;
            type Error = S::Error;

            #[inline(always)]
            fn $method<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), S::Error> {
                let value = self.value(value);
                self.inner.$method(&value)
            }

            #[inline(always)]
            fn end(self) -> Result<S::Ok, S::Error> {
                self.$end();
                self.inner.end()
            }
        }
    )*};
}

bounded_elements!(
    SerializeSeq::serialize_element, end_compound;
    SerializeTuple::serialize_element, end_compound;
    SerializeTupleStruct::serialize_field, end_compound;
    SerializeTupleVariant::serialize_field, end_variant;
);

impl<S: ser::SerializeMap, const RON: bool> ser::SerializeMap for BoundedSerializer<'_, S, RON> {
    type Ok = S::Ok;
    type Error = S::Error;

    #[inline(always)]
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), S::Error> {
        let key = self.value(key);
        self.inner.serialize_key(&key)
    }

    #[inline(always)]
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), S::Error> {
        let value = self.value(value);
        self.inner.serialize_value(&value)
    }

    #[inline(always)]
    fn end(self) -> Result<S::Ok, S::Error> {
        self.budget.leave();
        self.inner.end()
    }
}

impl<S: ser::SerializeStruct, const RON: bool> ser::SerializeStruct
    for BoundedSerializer<'_, S, RON>
{
    type Ok = S::Ok;
    type Error = S::Error;

    #[inline(always)]
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), S::Error> {
        let value = self.value(value);
        self.inner.serialize_field(key, &value)
    }

    #[inline(always)]
    fn skip_field(&mut self, key: &'static str) -> Result<(), S::Error> {
        self.inner.skip_field(key)
    }

    #[inline(always)]
    fn end(self) -> Result<S::Ok, S::Error> {
        self.budget.leave();
        self.inner.end()
    }
}

impl<S: ser::SerializeStructVariant, const RON: bool> ser::SerializeStructVariant
    for BoundedSerializer<'_, S, RON>
{
    type Ok = S::Ok;
    type Error = S::Error;

    #[inline(always)]
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), S::Error> {
        let value = self.value(value);
        self.inner.serialize_field(key, &value)
    }

    #[inline(always)]
    fn skip_field(&mut self, key: &'static str) -> Result<(), S::Error> {
        self.inner.skip_field(key)
    }

    #[inline(always)]
    fn end(self) -> Result<S::Ok, S::Error> {
        self.end_variant();
        self.inner.end()
    }
}
