//! Domain types shared by both services.

pub mod status;

pub use status::MessageStatus;
