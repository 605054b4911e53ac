//! Third-party decoders (arrow's parquet reader) can panic on a damaged file instead of
//! returning an error. [`contain_panic`] turns such a panic into an error message, without the
//! panic's own report on stderr, so a bad file is a clear error like any other.

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Once;

thread_local! {
    static QUIET: Cell<bool> = const { Cell::new(false) };
}

static HOOK: Once = Once::new();

/// Run `f`; a panic inside it becomes `Err(its message)`.
pub fn contain_panic<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(Cell::get) {
                previous(info);
            }
        }));
    });
    let was = QUIET.with(|q| q.replace(true));
    let result = catch_unwind(AssertUnwindSafe(f));
    QUIET.with(|q| q.set(was));
    result.map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown failure".into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_become_messages_and_values_pass_through() {
        assert_eq!(contain_panic(|| 3), Ok(3));
        let e = contain_panic(|| -> u8 { panic!("offset {} out of bounds", 7) }).unwrap_err();
        assert_eq!(e, "offset 7 out of bounds");
    }
}
