//! Domain types shared by both services.

pub mod inbound;
pub mod phone;
pub mod send;
pub mod sms;
pub mod status;

pub use inbound::InboundSms;
pub use phone::PhoneNumber;
pub use sms::{Encoding, SmsText};
pub use status::MessageStatus;
