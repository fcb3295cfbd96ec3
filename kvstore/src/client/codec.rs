//! Codecs turn typed values into stored bytes and back.

use std::convert::Infallible;
use std::fmt;
use std::marker::PhantomData;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Encodes and decodes the values stored under keys. Codecs are cheap to clone and shared
/// between tasks.
pub trait Codec: Clone + Send + Sync + 'static {
    /// The typed value.
    type Value: Send + 'static;
    /// Why encoding or decoding failed.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Turns a value into the bytes to store.
    fn encode(&self, value: &Self::Value) -> Result<Vec<u8>, Self::Error>;

    /// Turns stored bytes into a value. Takes ownership so byte codecs need not copy.
    fn decode(&self, bytes: Vec<u8>) -> Result<Self::Value, Self::Error>;
}

/// Stores values as they are (`Vec<u8>`); decoding never fails. Used for mirroring.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Value = Vec<u8>;
    type Error = Infallible;

    fn encode(&self, value: &Vec<u8>) -> Result<Vec<u8>, Infallible> {
        Ok(value.clone())
    }

    fn decode(&self, bytes: Vec<u8>) -> Result<Vec<u8>, Infallible> {
        Ok(bytes)
    }
}

/// Stores UTF-8 strings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StringCodec;

impl Codec for StringCodec {
    type Value = String;
    type Error = std::string::FromUtf8Error;

    fn encode(&self, value: &String) -> Result<Vec<u8>, Self::Error> {
        Ok(value.as_bytes().to_vec())
    }

    fn decode(&self, bytes: Vec<u8>) -> Result<String, Self::Error> {
        String::from_utf8(bytes)
    }
}

/// Stores `T` as JSON with `serde_json`.
pub struct JsonCodec<T> {
    // `fn() -> T` keeps the codec `Send + Sync` whatever `T` is.
    _marker: PhantomData<fn() -> T>,
}

impl<T> JsonCodec<T> {
    /// A JSON codec for `T`.
    pub const fn new() -> Self {
        JsonCodec {
            _marker: PhantomData,
        }
    }
}

impl<T> Default for JsonCodec<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Clone for JsonCodec<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for JsonCodec<T> {}

impl<T> fmt::Debug for JsonCodec<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JsonCodec<{}>", std::any::type_name::<T>())
    }
}

impl<T> Codec for JsonCodec<T>
where
    T: Serialize + DeserializeOwned + Send + 'static,
{
    type Value = T;
    type Error = serde_json::Error;

    fn encode(&self, value: &T) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(value)
    }

    fn decode(&self, bytes: Vec<u8>) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Node {
        name: String,
        id: u32,
    }

    #[test]
    fn json_round_trip_and_error() {
        let codec = JsonCodec::<Node>::new();
        let node = Node {
            name: "a".into(),
            id: 7,
        };
        let bytes = codec.encode(&node).unwrap();
        assert_eq!(codec.decode(bytes).unwrap(), node);
        assert!(codec.decode(b"{\"name\":1}".to_vec()).is_err());
    }

    #[test]
    fn raw_and_string() {
        assert_eq!(RawCodec.decode(vec![0, 255]).unwrap(), vec![0, 255]);
        assert_eq!(StringCodec.decode(b"x".to_vec()).unwrap(), "x");
        assert!(StringCodec.decode(vec![0xff]).is_err());
    }
}
