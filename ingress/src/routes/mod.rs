pub mod health;
pub mod plivo;
