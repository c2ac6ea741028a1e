/* The KVM guest program: a tiny 64-bit long-mode "OS" that dirties its RAM in the patterns
 * of the process workloads and keeps the process guest's ledger (guests/memory.py) exactly:
 * for each page it bumps the u32 ledger entry first, then writes the page's stamp
 *     word 0 = (0x564D << 48) | p,  word 1 = v,  word i >= 2 = h(p, v) XOR K[i]
 * with h = splitmix64 finaliser of ((p << 32) | v) + GAMMA and K the host-provided table.
 * So the host checks the guest's RAM with the same code as a process guest's.
 *
 * Position independent: the host loads it at the firmware area (top of RAM, its address
 * depends on the RAM size) and enters at offset 0 with
 *     r15 = params/state page, r14 = status page (a device page, not RAM),
 *     r13 = K table, rsp = top of the stack page.
 * Everything that must survive migration is in RAM (the params/state page) or registers
 * (the vCPU context).  Hypercalls are port writes the host's vCPU loop serves:
 *     out 0x10: sleep until status[SLEEP_UNTIL_NS] (or until the host pauses the vCPU)
 *     out 0x11: fatal error, code in status[ERROR]
 * Layout numbers are mirrored in guests/kvm/layout.py (a test holds them equal).
 *
 * Assembled by guests/kvm/assemble.py (GNU as + objcopy) into program.bin beside this file.
 */
    .intel_syntax noprefix
    .code64

    /* params/state page (r15), u64 words */
    .set P_PATTERN, 8*1
    .set P_FIRST_DATA, 8*2
    .set P_DATA_PAGES, 8*3
    .set P_TICKS_PER_PAGE, 8*4
    .set P_BATCH, 8*5
    .set P_HOT_PAGES, 8*6
    .set P_HOT_THRESH, 8*7
    .set P_STRIDE, 8*8
    .set P_RNG, 8*9
    .set P_SWEEP_POS, 8*10
    .set P_VSTART, 8*11
    .set P_PACED, 8*12
    .set P_STEPS, 8*13
    .set P_PAGES_WRITTEN, 8*14
    .set P_STOLEN, 8*15
    .set P_IDLE_TICKS, 8*16
    .set P_THROTTLED_NS, 8*17

    /* status page (r14): the guest's status device, words at guests/control.py Field * 8 */
    .set S_STEPS, 0x48
    .set S_LAST_STEP_NS, 0x50
    .set S_FIRST_STEP_NS, 0x58
    .set S_PAGES_WRITTEN, 0x60
    .set S_RESUMED_AT_NS, 0x98
    .set S_THROTTLE_PPM, 0xa0
    .set S_THROTTLED_NS, 0xa8
    .set S_MAX_GAP_NS, 0xb0
    .set S_MAX_GAP_END_NS, 0xb8
    .set S_CLK_TSC_BASE, 0x200
    .set S_CLK_NS_BASE, 0x208
    .set S_CLK_MULT, 0x210
    .set S_GAP_FROM_NS, 0x218
    .set S_SLEEP_UNTIL_NS, 0x220
    .set S_ERROR, 0x228

    .set PORT_SLEEP, 0x10
    .set PORT_FATAL, 0x11

entry:
main_loop:
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov rbp, rax                    /* rbp = TSC at the start of the step */
    mov r12, [r15 + P_BATCH]
    cmp qword ptr [r15 + P_PATTERN], 0
    je 2f                           /* idle: a step writes nothing */
1:  call pick_page
    call write_page
    dec r12
    jnz 1b
    mov rax, [r15 + P_BATCH]
    add [r15 + P_PAGES_WRITTEN], rax
    add [r15 + P_PACED], rax
2:  call publish
    call throttle
    call pace
    jmp main_loop

/* rax = current TSC */
read_tsc:
    rdtsc
    shl rdx, 32
    or rax, rdx
    ret

/* rax = CLOCK_MONOTONIC ns for TSC rax (the host's conversion in the status page) */
tsc_to_ns:
    sub rax, [r14 + S_CLK_TSC_BASE]
    mul qword ptr [r14 + S_CLK_MULT]
    shrd rax, rdx, 32
    add rax, [r14 + S_CLK_NS_BASE]
    ret

/* sleep until TSC rax (hypercall); clobbers rax, rdx */
sleep_until_tsc:
    call tsc_to_ns
    mov [r14 + S_SLEEP_UNTIL_NS], rax
    mov dx, PORT_SLEEP
    out dx, al
    ret

/* rax = next xorshift64* output; state in the params page */
rng:
    mov rax, [r15 + P_RNG]
    mov rdx, rax
    shr rdx, 12
    xor rax, rdx
    mov rdx, rax
    shl rdx, 25
    xor rax, rdx
    mov rdx, rax
    shr rdx, 27
    xor rax, rdx
    mov [r15 + P_RNG], rax
    movabs rdx, 0x2545F4914F6CDD1D
    imul rax, rdx
    ret

/* rdi = the next page to write (absolute page number) */
pick_page:
    mov rax, [r15 + P_PATTERN]
    cmp rax, 3
    je pick_sweep
    cmp rax, 2
    jne pick_uniform
    call rng                        /* hotcold: low 32 bits decide hot or cold */
    cmp eax, [r15 + P_HOT_THRESH]
    jae pick_uniform
    call rng
    mul qword ptr [r15 + P_HOT_PAGES]
    mov rdi, rdx
    add rdi, [r15 + P_FIRST_DATA]
    ret
pick_uniform:
    call rng
    mul qword ptr [r15 + P_DATA_PAGES]   /* rdx = floor(r * n / 2^64) */
    mov rdi, rdx
    add rdi, [r15 + P_FIRST_DATA]
    ret
pick_sweep:
    mov rdi, [r15 + P_SWEEP_POS]
    mov rax, rdi
    add rax, [r15 + P_STRIDE]
3:  cmp rax, [r15 + P_DATA_PAGES]
    jb 4f
    sub rax, [r15 + P_DATA_PAGES]
    jmp 3b
4:  mov [r15 + P_SWEEP_POS], rax
    add rdi, [r15 + P_FIRST_DATA]
    ret

/* Stamp page rdi: ledger entry first, then the body (the ledger's concurrency contract). */
write_page:
    mov eax, [4096 + rdi*4]
    inc eax
    jnz 5f
    inc eax                         /* u32 wrap skips 0 ("never written") */
5:  mov [4096 + rdi*4], eax
    mov r8, rax                     /* r8 = v */
    mov rbx, rdi
    shl rbx, 32
    or rbx, rax
    movabs rax, 0x9E3779B97F4A7C15
    add rbx, rax
    mov rax, rbx                    /* splitmix64 finaliser */
    shr rax, 30
    xor rbx, rax
    movabs rax, 0xBF58476D1CE4E5B9
    imul rbx, rax
    mov rax, rbx
    shr rax, 27
    xor rbx, rax
    movabs rax, 0x94D049BB133111EB
    imul rbx, rax
    mov rax, rbx
    shr rax, 31
    xor rbx, rax                    /* rbx = h(p, v) */
    mov rsi, rdi
    shl rsi, 12                     /* rsi = the page */
    /* Words 0 and 1 first, each word written once with its final value: a page caught
       mid-write (the vCPU kicked) holds only bytes of its old or new stamp. */
    movabs rax, 0x564D000000000000
    or rax, rdi
    mov [rsi], rax
    mov [rsi + 8], r8
    mov rax, [r13 + 16]
    xor rax, rbx
    mov [rsi + 16], rax
    mov rax, [r13 + 24]
    xor rax, rbx
    mov [rsi + 24], rax
    mov rax, [r13 + 32]
    xor rax, rbx
    mov [rsi + 32], rax
    mov rax, [r13 + 40]
    xor rax, rbx
    mov [rsi + 40], rax
    mov rax, [r13 + 48]
    xor rax, rbx
    mov [rsi + 48], rax
    mov rax, [r13 + 56]
    xor rax, rbx
    mov [rsi + 56], rax
    mov ecx, 64
    /* general registers only: this host's instruction emulator has no SSE */
6:  mov rax, [r13 + rcx + 0]
    xor rax, rbx
    mov [rsi + rcx + 0], rax
    mov rax, [r13 + rcx + 8]
    xor rax, rbx
    mov [rsi + rcx + 8], rax
    mov rax, [r13 + rcx + 16]
    xor rax, rbx
    mov [rsi + rcx + 16], rax
    mov rax, [r13 + rcx + 24]
    xor rax, rbx
    mov [rsi + rcx + 24], rax
    mov rax, [r13 + rcx + 32]
    xor rax, rbx
    mov [rsi + rcx + 32], rax
    mov rax, [r13 + rcx + 40]
    xor rax, rbx
    mov [rsi + rcx + 40], rax
    mov rax, [r13 + rcx + 48]
    xor rax, rbx
    mov [rsi + rcx + 48], rax
    mov rax, [r13 + rcx + 56]
    xor rax, rbx
    mov [rsi + rcx + 56], rax
    add ecx, 64
    cmp ecx, 4096
    jne 6b
    ret

/* After a step: counters, first step after a resume, longest gap between steps. */
publish:
    inc qword ptr [r15 + P_STEPS]
    call read_tsc
    call tsc_to_ns
    mov rbx, rax                    /* rbx = now (ns) */
    mov rax, [r15 + P_STEPS]
    mov [r14 + S_STEPS], rax
    mov rax, [r15 + P_PAGES_WRITTEN]
    mov [r14 + S_PAGES_WRITTEN], rax
    mov [r14 + S_LAST_STEP_NS], rbx
    mov rax, [r14 + S_FIRST_STEP_NS]
    cmp rax, [r14 + S_RESUMED_AT_NS]
    jge 7f
    mov [r14 + S_FIRST_STEP_NS], rbx
7:  mov rax, [r14 + S_GAP_FROM_NS]
    test rax, rax
    jz 8f
    mov rcx, rbx
    sub rcx, rax
    cmp rcx, [r14 + S_MAX_GAP_NS]
    jle 8f
    mov [r14 + S_MAX_GAP_NS], rcx
    mov [r14 + S_MAX_GAP_END_NS], rbx
8:  mov [r14 + S_GAP_FROM_NS], rbx
    ret

/* Auto-converge: sleep ppm/(1e6-ppm) of the step's time; the pacing clock skips it. */
throttle:
    mov rcx, [r14 + S_THROTTLE_PPM]
    test rcx, rcx
    jz 9f
    call read_tsc
    mov rbx, rax
    sub rax, rbp                    /* step ticks */
    mul rcx
    mov r9, 1000000
    sub r9, rcx
    div r9                          /* rax = ticks to steal */
    add [r15 + P_STOLEN], rax
    mov r10, rax
    mul qword ptr [r14 + S_CLK_MULT] /* throttled ns = ticks * mult >> 32, published first */
    shrd rax, rdx, 32
    add [r15 + P_THROTTLED_NS], rax
    mov rax, [r15 + P_THROTTLED_NS]
    mov [r14 + S_THROTTLED_NS], rax
    mov rax, r10
    add rax, rbx
    jmp sleep_until_tsc
9:  ret

/* Pacing: `rate` pages/s of virtual time (TSC minus stolen ticks); idle sleeps a tick. */
pace:
    cmp qword ptr [r15 + P_PATTERN], 0
    jne 10f
    call read_tsc
    add rax, [r15 + P_IDLE_TICKS]
    jmp sleep_until_tsc
10: mov rcx, [r15 + P_TICKS_PER_PAGE]
    test rcx, rcx
    jz 11f                          /* rate 0: as fast as possible */
    mov rax, [r15 + P_PACED]
    mul rcx
    add rax, [r15 + P_VSTART]       /* rax = virtual TSC when the paced pages are due */
    mov rbx, rax
    call read_tsc
    sub rax, [r15 + P_STOLEN]       /* virtual now */
    cmp rax, rbx
    jae 11f
    sub rbx, rax                    /* ahead of schedule by rbx ticks */
    call read_tsc
    add rax, rbx
    jmp sleep_until_tsc
11: ret
