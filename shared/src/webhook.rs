//! Signatures of the webhooks smsflow sends, per the Standard Webhooks specification
//! (<https://www.standardwebhooks.com>): any of its libraries verifies them.
//!
//! A secret is written `whsec_` followed by the base64 of its key bytes. The signed text is
//! `{webhook-id}.{webhook-timestamp}.{body}`; the `webhook-signature` header holds one
//! `v1,{base64 HMAC-SHA256}` per secret, separated by spaces, so a receiver that knows any one
//! of them verifies: rotating a secret means signing with the new and the old for a while.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

pub const ID_HEADER: &str = "webhook-id";
pub const TIMESTAMP_HEADER: &str = "webhook-timestamp";
pub const SIGNATURE_HEADER: &str = "webhook-signature";

const SECRET_PREFIX: &str = "whsec_";

/// A secret's key bytes. No `Debug`: it never reaches a log.
#[derive(Clone)]
pub struct SigningKey(Vec<u8>);

impl SigningKey {
    /// Reads a `whsec_…` secret; the error says what is wrong without repeating the secret.
    pub fn parse(secret: &str) -> Result<Self, String> {
        let encoded = secret.strip_prefix(SECRET_PREFIX).ok_or("must start with whsec_")?;
        let key = BASE64.decode(encoded).map_err(|_| "must be whsec_ followed by standard base64".to_owned())?;
        // The specification asks for 24 to 64 random bytes.
        if !(24..=64).contains(&key.len()) {
            return Err(format!("must hold 24 to 64 bytes of key (this one holds {})", key.len()));
        }
        Ok(Self(key))
    }
}

/// The `webhook-signature` header for a message: one signature per key, first key first.
pub fn signature_header(keys: &[SigningKey], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut signed = Vec::with_capacity(id.len() + body.len() + 24);
    signed.extend_from_slice(format!("{id}.{timestamp}.").as_bytes());
    signed.extend_from_slice(body);
    keys.iter()
        .map(|key| format!("v1,{}", crate::plivo::signature::hmac_sha256_base64(&key.0, &signed)))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the specification's reference libraries.
    #[test]
    fn signs_as_the_reference_libraries_do() {
        let key = SigningKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let header = signature_header(&[key], "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, br#"{"test": 2432232314}"#);
        assert_eq!(header, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn every_key_signs_for_rotation() {
        let old = SigningKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let new = SigningKey::parse(&format!("whsec_{}", BASE64.encode([7u8; 32]))).unwrap();
        let header = signature_header(&[new.clone(), old.clone()], "id", 1, b"{}");
        let parts: Vec<&str> = header.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0], signature_header(&[new], "id", 1, b"{}"));
        assert_eq!(parts[1], signature_header(&[old], "id", 1, b"{}"));
    }

    #[test]
    fn malformed_secrets_are_refused_with_the_reason() {
        assert_eq!(SigningKey::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").err().unwrap(), "must start with whsec_");
        assert!(SigningKey::parse("whsec_not base64!").err().unwrap().contains("base64"));
        let short = SigningKey::parse(&format!("whsec_{}", BASE64.encode([1u8; 8]))).err().unwrap();
        assert!(short.contains("24 to 64 bytes"), "{short}");
    }
}
