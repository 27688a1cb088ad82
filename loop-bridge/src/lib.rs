//! Loop devices with a chosen logical sector size.
