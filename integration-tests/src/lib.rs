//! Test infrastructure: loop devices, images and QEMU guests.
