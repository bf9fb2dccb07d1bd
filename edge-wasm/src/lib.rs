pub use tandem_common as common;
