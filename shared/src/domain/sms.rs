//! SMS text: its encoding (GSM-7 or UCS-2), segment count, and Plivo's length limits
//! (docs/plivo.md §4).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    Gsm7,
    Ucs2,
}

impl Encoding {
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Gsm7 => "gsm7",
            Encoding::Ucs2 => "ucs2",
        }
    }
}

/// Plivo refuses longer text (error 110).
pub const MAX_GSM7_CHARS: usize = 1600;
pub const MAX_UCS2_CHARS: usize = 737;

const GSM7_BASIC: &str = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà";
/// Characters of the extension table: each takes two septets (escape + code).
const GSM7_EXTENSION: &str = "^{}\\[]~|€\u{000C}";

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SmsText {
    pub encoding: Encoding,
    /// Billable parts: 160/153 septets for GSM-7, 70/67 UTF-16 units for UCS-2.
    pub segments: u16,
    /// Characters as Plivo counts them against its limit.
    pub length: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    #[error("must not be empty")]
    Empty,
    #[error("is {length} characters; Plivo allows at most {max} for {encoding} text")]
    TooLong { length: usize, max: usize, encoding: &'static str },
}

impl SmsText {
    pub fn analyse(text: &str) -> Result<Self, TextError> {
        if text.trim().is_empty() {
            return Err(TextError::Empty);
        }
        let gsm_septets: Option<usize> = text
            .chars()
            .map(|c| {
                if GSM7_BASIC.contains(c) {
                    Some(1)
                } else if GSM7_EXTENSION.contains(c) {
                    Some(2)
                } else {
                    None
                }
            })
            .sum();
        let (encoding, units, length, max, single, multi) = match gsm_septets {
            Some(septets) => (Encoding::Gsm7, septets, text.chars().count(), MAX_GSM7_CHARS, 160, 153),
            None => {
                let units = text.encode_utf16().count();
                (Encoding::Ucs2, units, units, MAX_UCS2_CHARS, 70, 67)
            }
        };
        if length > max {
            return Err(TextError::TooLong { length, max, encoding: encoding.as_str() });
        }
        let segments = if units <= single { 1 } else { units.div_ceil(multi) };
        Ok(Self { encoding, segments: segments as u16, length })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gsm7_segments_are_160_then_153_and_extension_characters_count_double() {
        assert_eq!(SmsText::analyse(&"a".repeat(160)).unwrap().segments, 1);
        assert_eq!(SmsText::analyse(&"a".repeat(161)).unwrap().segments, 2);
        assert_eq!(SmsText::analyse(&"a".repeat(306)).unwrap().segments, 2);
        assert_eq!(SmsText::analyse(&"a".repeat(307)).unwrap().segments, 3);
        let with_euro = format!("{}€", "a".repeat(159)); // 161 septets
        let t = SmsText::analyse(&with_euro).unwrap();
        assert_eq!((t.encoding, t.segments), (Encoding::Gsm7, 2));
    }

    #[test]
    fn any_character_outside_gsm7_makes_the_whole_text_ucs2() {
        let t = SmsText::analyse(&format!("{}ł", "a".repeat(69))).unwrap();
        assert_eq!((t.encoding, t.segments), (Encoding::Ucs2, 1));
        assert_eq!(SmsText::analyse(&"ł".repeat(71)).unwrap().segments, 2);
        assert_eq!(SmsText::analyse("😀").unwrap().length, 2, "emoji take two UTF-16 units");
    }

    #[test]
    fn limits_and_emptiness_are_enforced() {
        assert_eq!(SmsText::analyse("  "), Err(TextError::Empty));
        assert!(SmsText::analyse(&"a".repeat(1600)).is_ok());
        assert!(matches!(SmsText::analyse(&"a".repeat(1601)), Err(TextError::TooLong { max: 1600, .. })));
        assert!(matches!(SmsText::analyse(&"ł".repeat(738)), Err(TextError::TooLong { max: 737, .. })));
    }
}
