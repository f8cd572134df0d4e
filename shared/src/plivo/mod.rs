//! Plivo's wire protocol: the Send Message API, callbacks' fields, webhook signatures, form
//! decoding, error codes.

pub mod api;
pub mod callback;
pub mod errors;
pub mod form;
pub mod signature;
