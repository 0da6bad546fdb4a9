//! OpenAPI schemas of the enums used on the wire that are not DTOs (`Usage`, `Brand`,
//! `TransactionType`, `Frequency`): string enums whose values are the types' own serde names, so
//! the schema cannot drift from what the API sends.

use std::borrow::Cow;

use serde::Serialize;
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ObjectBuilder, Schema, SchemaType, Type};
use utoipa::{PartialSchema, ToSchema};

use crate::domain::provider::TransactionType;
use crate::domain::recurring::Frequency;
use crate::domain::token::Usage;
use tokengate_cards::Brand;

/// A string enum whose values are the domain type's own serde names, so the schema cannot
/// disagree with what is serialized.
fn string_enum<T: Serialize>(description: &str, values: &[T]) -> RefOr<Schema> {
    let names: Vec<serde_json::Value> = values
        .iter()
        .filter_map(|v| serde_json::to_value(v).ok())
        .collect();
    ObjectBuilder::new()
        .schema_type(SchemaType::Type(Type::String))
        .description(Some(description))
        .enum_values(Some(names))
        .into()
}

/// Every `Usage`; the `match` stops compiling when a variant is added, so the list cannot lag.
fn all_usages() -> [Usage; 3] {
    let _exhaustive = |u: Usage| match u {
        Usage::CardOnFile | Usage::OneOff | Usage::Recurring => (),
    };
    [Usage::CardOnFile, Usage::OneOff, Usage::Recurring]
}

fn all_brands() -> [Brand; 8] {
    let _exhaustive = |b: Brand| match b {
        Brand::Visa
        | Brand::Mastercard
        | Brand::Amex
        | Brand::Discover
        | Brand::Jcb
        | Brand::Unionpay
        | Brand::Diners
        | Brand::Unknown => (),
    };
    [
        Brand::Visa,
        Brand::Mastercard,
        Brand::Amex,
        Brand::Discover,
        Brand::Jcb,
        Brand::Unionpay,
        Brand::Diners,
        Brand::Unknown,
    ]
}

fn all_transaction_types() -> [TransactionType; 2] {
    let _exhaustive = |t: TransactionType| match t {
        TransactionType::Cit | TransactionType::Mit => (),
    };
    [TransactionType::Cit, TransactionType::Mit]
}

impl PartialSchema for Usage {
    fn schema() -> RefOr<Schema> {
        string_enum("What the merchant will use the token for.", &all_usages())
    }
}

impl ToSchema for Usage {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("Usage")
    }
}

/// The OpenAPI schema of [`Brand`] (a type of the cards crate, which knows nothing of OpenAPI):
/// DTO fields of type `Brand` name it with `#[schema(value_type = BrandSchema)]`.
pub struct BrandSchema;

impl PartialSchema for BrandSchema {
    fn schema() -> RefOr<Schema> {
        string_enum("Card scheme, derived from the BIN.", &all_brands())
    }
}

impl ToSchema for BrandSchema {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("Brand")
    }
}

impl PartialSchema for TransactionType {
    fn schema() -> RefOr<Schema> {
        string_enum(
            "Customer-initiated (`CIT`) or merchant-initiated (`MIT`) transaction.",
            &all_transaction_types(),
        )
    }
}

impl ToSchema for TransactionType {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("TransactionType")
    }
}

impl PartialSchema for Frequency {
    fn schema() -> RefOr<Schema> {
        string_enum(
            "How often the merchant charges under a recurring agreement; `UNSCHEDULED`: at no \
             fixed interval (top-ups, usage-based).",
            &Frequency::all(),
        )
    }
}

impl ToSchema for Frequency {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("Frequency")
    }
}
