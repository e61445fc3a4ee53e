fn main() {
    testcfg::emit();
}
