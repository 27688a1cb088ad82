//! Partition tables (GPT, MBR) at any sector size: inspect, repair, verify.
