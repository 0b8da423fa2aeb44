//! A QEMU microVM backend: KVM where it works, TCG where it does not, a guest agent inside.
