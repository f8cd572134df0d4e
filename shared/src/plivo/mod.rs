//! Plivo's wire protocol: webhook signatures, form decoding, error codes.

pub mod errors;
pub mod form;
pub mod signature;
