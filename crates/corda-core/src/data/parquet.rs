//! Parquet files as JSON rows.
//!
//! The hub serves most datasets as parquet, while templates and the rest of the pipeline work
//! on `serde_json::Value` rows, so each Arrow column is converted to JSON values. The Arrow
//! type follows the writer's schema: pyarrow may write `string`, `large_string` or
//! `string_view`, and all three must be handled (calling the wrong accessor panics).

use std::collections::BTreeSet;
use std::fs::File;
use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::types::ArrowTemporalType;
use arrow_array::types::{
    Date32Type, Date64Type, Decimal128Type, Float16Type, Float32Type, Float64Type, Int16Type,
    Int32Type, Int64Type, Int8Type, TimestampMicrosecondType, TimestampMillisecondType,
    TimestampNanosecondType, TimestampSecondType, UInt16Type, UInt32Type, UInt64Type, UInt8Type,
};
use arrow_array::{Array, ArrowPrimitiveType, OffsetSizeTrait, RecordBatch};
use arrow_schema::{DataType, TimeUnit};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::{Map, Number, Value};

use crate::{CordaError, Result};

/// Reads every row of a parquet file as a JSON object (columns in schema order).
///
/// Columns of a type with no JSON counterpart (maps, unions, durations, …) become `null`, with
/// one warning per file, so that an exotic unused column does not block the whole dataset.
pub fn read_parquet(path: &Path) -> Result<Vec<Value>> {
    // arrow panics on some damaged files (found by the fuzz tests) instead of failing.
    crate::util::contain::contain_panic(|| read_parquet_inner(path)).unwrap_or_else(|why| {
        Err(CordaError::Data(format!(
            "{}: cannot decode parquet data ({why}); the file is damaged, re-download or re-export it",
            path.display()
        )))
    })
}

fn read_parquet_inner(path: &Path) -> Result<Vec<Value>> {
    let unreadable = |e: parquet::errors::ParquetError| {
        CordaError::Data(format!(
            "{}: cannot read parquet ({e}); the file may be truncated or use an unsupported \
             compression (snappy and zstd are supported), re-download or re-export it",
            path.display()
        ))
    };
    let file = File::open(path).map_err(|e| CordaError::io(path, e))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
        .map_err(unreadable)?;
    let mut rows = Vec::new();
    let mut unsupported = BTreeSet::new();
    for batch in reader {
        let batch = batch.map_err(|e| {
            CordaError::Data(format!(
                "{}: cannot decode parquet data ({e}); re-download or re-export the file",
                path.display()
            ))
        })?;
        append_batch(&batch, &mut rows, &mut unsupported);
    }
    if !unsupported.is_empty() {
        tracing::warn!(
            file = %path.display(),
            "parquet columns of unsupported types read as null: {}",
            unsupported.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    Ok(rows)
}

/// Appends the rows of one record batch to `rows`.
pub fn append_batch(
    batch: &RecordBatch,
    rows: &mut Vec<Value>,
    unsupported: &mut BTreeSet<String>,
) {
    let schema = batch.schema();
    let columns: Vec<Vec<Value>> = batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(col, field)| {
            let mut odd = BTreeSet::new();
            let values = to_json(col.as_ref(), &mut odd);
            unsupported.extend(odd.into_iter().map(|t| format!("{} ({t})", field.name())));
            values
        })
        .collect();
    let mut iters: Vec<_> = columns.into_iter().map(Vec::into_iter).collect();
    for _ in 0..batch.num_rows() {
        let mut obj = Map::with_capacity(iters.len());
        for (field, it) in schema.fields().iter().zip(iters.iter_mut()) {
            obj.insert(field.name().clone(), it.next().unwrap_or(Value::Null));
        }
        rows.push(Value::Object(obj));
    }
}

/// Converts an Arrow array into one JSON value per element (nulls become `Value::Null`).
/// Names of unsupported types are added to `unsupported`.
pub fn to_json(array: &dyn Array, unsupported: &mut BTreeSet<String>) -> Vec<Value> {
    let len = array.len();
    let nullable = |f: &dyn Fn(usize) -> Value| -> Vec<Value> {
        (0..len)
            .map(|i| if array.is_null(i) { Value::Null } else { f(i) })
            .collect()
    };
    match array.data_type() {
        DataType::Null => vec![Value::Null; len],
        DataType::Boolean => {
            let a = array.as_boolean();
            nullable(&|i| Value::Bool(a.value(i)))
        }
        DataType::Int8 => integers::<Int8Type>(array),
        DataType::Int16 => integers::<Int16Type>(array),
        DataType::Int32 => integers::<Int32Type>(array),
        DataType::Int64 => integers::<Int64Type>(array),
        DataType::UInt8 => integers::<UInt8Type>(array),
        DataType::UInt16 => integers::<UInt16Type>(array),
        DataType::UInt32 => integers::<UInt32Type>(array),
        DataType::UInt64 => integers::<UInt64Type>(array),
        DataType::Float16 => {
            let a = array.as_primitive::<Float16Type>();
            nullable(&|i| float(f64::from(a.value(i))))
        }
        DataType::Float32 => {
            let a = array.as_primitive::<Float32Type>();
            nullable(&|i| float(f64::from(a.value(i))))
        }
        DataType::Float64 => {
            let a = array.as_primitive::<Float64Type>();
            nullable(&|i| float(a.value(i)))
        }
        DataType::Decimal128(_, _) => {
            let a = array.as_primitive::<Decimal128Type>();
            nullable(&|i| Value::String(a.value_as_string(i)))
        }
        DataType::Date32 => datetimes::<Date32Type>(array),
        DataType::Date64 => datetimes::<Date64Type>(array),
        DataType::Timestamp(TimeUnit::Second, _) => datetimes::<TimestampSecondType>(array),
        DataType::Timestamp(TimeUnit::Millisecond, _) => {
            datetimes::<TimestampMillisecondType>(array)
        }
        DataType::Timestamp(TimeUnit::Microsecond, _) => {
            datetimes::<TimestampMicrosecondType>(array)
        }
        DataType::Timestamp(TimeUnit::Nanosecond, _) => datetimes::<TimestampNanosecondType>(array),
        DataType::Utf8 => {
            let a = array.as_string::<i32>();
            nullable(&|i| Value::String(a.value(i).to_string()))
        }
        DataType::LargeUtf8 => {
            let a = array.as_string::<i64>();
            nullable(&|i| Value::String(a.value(i).to_string()))
        }
        DataType::Utf8View => {
            let a = array.as_string_view();
            nullable(&|i| Value::String(a.value(i).to_string()))
        }
        DataType::Binary => {
            let a = array.as_binary::<i32>();
            nullable(&|i| lossy(a.value(i)))
        }
        DataType::LargeBinary => {
            let a = array.as_binary::<i64>();
            nullable(&|i| lossy(a.value(i)))
        }
        DataType::BinaryView => {
            let a = array.as_binary_view();
            nullable(&|i| lossy(a.value(i)))
        }
        DataType::FixedSizeBinary(_) => {
            let a = array.as_fixed_size_binary();
            nullable(&|i| lossy(a.value(i)))
        }
        DataType::List(_) => lists::<i32>(array, unsupported),
        DataType::LargeList(_) => lists::<i64>(array, unsupported),
        DataType::FixedSizeList(_, size) => {
            let a = array.as_fixed_size_list();
            let size = usize::try_from(*size).unwrap_or(0);
            let values = to_json(a.values().as_ref(), unsupported);
            nullable(&|i| {
                let start = a.value_offset_at(i);
                Value::Array(slice(&values, start, start + size))
            })
        }
        DataType::Struct(fields) => {
            let a = array.as_struct();
            let children: Vec<Vec<Value>> = a
                .columns()
                .iter()
                .map(|c| to_json(c.as_ref(), unsupported))
                .collect();
            nullable(&|i| {
                let obj: Map<String, Value> = fields
                    .iter()
                    .zip(&children)
                    .map(|(f, col)| (f.name().clone(), col.get(i).cloned().unwrap_or_default()))
                    .collect();
                Value::Object(obj)
            })
        }
        DataType::Dictionary(_, _) => {
            let a = array.as_any_dictionary();
            let values = to_json(a.values().as_ref(), unsupported);
            if values.is_empty() {
                return vec![Value::Null; len];
            }
            let keys = a.normalized_keys();
            nullable(&|i| values[keys[i]].clone())
        }
        other => {
            unsupported.insert(other.to_string());
            vec![Value::Null; len]
        }
    }
}

fn lists<O: OffsetSizeTrait>(array: &dyn Array, unsupported: &mut BTreeSet<String>) -> Vec<Value> {
    let a = array.as_list::<O>();
    let values = to_json(a.values().as_ref(), unsupported);
    let offsets = a.value_offsets();
    (0..a.len())
        .map(|i| {
            if a.is_null(i) {
                Value::Null
            } else {
                let (start, end) = (offsets[i].as_usize(), offsets[i + 1].as_usize());
                Value::Array(slice(&values, start, end))
            }
        })
        .collect()
}

fn slice(values: &[Value], start: usize, end: usize) -> Vec<Value> {
    values
        .get(start..end.min(values.len()))
        .map(<[Value]>::to_vec)
        .unwrap_or_default()
}

/// Integer columns of any width, signed or not, as JSON numbers.
fn integers<T>(array: &dyn Array) -> Vec<Value>
where
    T: ArrowPrimitiveType,
    T::Native: Into<serde_json::Number>,
{
    let a = array.as_primitive::<T>();
    (0..a.len())
        .map(|i| {
            if a.is_null(i) {
                Value::Null
            } else {
                Value::Number(a.value(i).into())
            }
        })
        .collect()
}

fn datetimes<T>(array: &dyn Array) -> Vec<Value>
where
    T: ArrowTemporalType,
    i64: From<T::Native>,
{
    let a = array.as_primitive::<T>();
    (0..a.len())
        .map(|i| {
            if a.is_null(i) {
                Value::Null
            } else {
                a.value_as_datetime(i)
                    .map_or(Value::Null, |d| Value::String(d.to_string()))
            }
        })
        .collect()
}

/// JSON has no NaN or infinity; those become `null`.
fn float(v: f64) -> Value {
    Number::from_f64(v).map_or(Value::Null, Value::Number)
}

fn lossy(bytes: &[u8]) -> Value {
    Value::String(String::from_utf8_lossy(bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use arrow_array::builder::{ListBuilder, StringBuilder};
    use arrow_array::{
        ArrayRef, DictionaryArray, Float64Array, Int64Array, LargeStringArray, StringViewArray,
        StructArray,
    };
    use arrow_schema::Field;
    use serde_json::json;

    #[test]
    fn converts_strings_of_every_width() {
        let mut odd = BTreeSet::new();
        let large = LargeStringArray::from(vec![Some("a"), None]);
        assert_eq!(to_json(&large, &mut odd), vec![json!("a"), Value::Null]);
        let view = StringViewArray::from(vec![Some("long enough to not be inlined"), None]);
        assert_eq!(
            to_json(&view, &mut odd),
            vec![json!("long enough to not be inlined"), Value::Null]
        );
        let dict: DictionaryArray<Int32Type> = vec!["x", "y", "x"].into_iter().collect();
        assert_eq!(
            to_json(&dict, &mut odd),
            vec![json!("x"), json!("y"), json!("x")]
        );
        assert!(odd.is_empty());
    }

    #[test]
    fn converts_numbers_lists_and_structs() {
        let mut odd = BTreeSet::new();
        let ints = Int64Array::from(vec![Some(1), None, Some(-3)]);
        assert_eq!(
            to_json(&ints, &mut odd),
            vec![json!(1), Value::Null, json!(-3)]
        );
        let floats = Float64Array::from(vec![1.5, f64::NAN]);
        assert_eq!(to_json(&floats, &mut odd), vec![json!(1.5), Value::Null]);

        let mut lb = ListBuilder::new(StringBuilder::new());
        lb.values().append_value("a");
        lb.values().append_value("b");
        lb.append(true);
        lb.append(false);
        lb.append(true);
        let list = lb.finish();
        assert_eq!(
            to_json(&list, &mut odd),
            vec![json!(["a", "b"]), Value::Null, json!([])]
        );

        let human: ArrayRef = Arc::new(arrow_array::StringArray::from(vec!["h0", "h1"]));
        let turns: ArrayRef = Arc::new(Int64Array::from(vec![1, 2]));
        let st = StructArray::from(vec![
            (Arc::new(Field::new("human", DataType::Utf8, false)), human),
            (Arc::new(Field::new("turns", DataType::Int64, false)), turns),
        ]);
        assert_eq!(
            to_json(&st, &mut odd),
            vec![
                json!({"human": "h0", "turns": 1}),
                json!({"human": "h1", "turns": 2})
            ]
        );
        assert!(odd.is_empty());
    }
}
