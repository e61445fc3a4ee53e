/*
 * The I/O ports through which the workload guest talks to its VMM. The Rust side mirrors these
 * in guest::abi; a unit test keeps the two in step.
 */
#ifndef LIVEMIG_GUEST_ABI_H
#define LIVEMIG_GUEST_ABI_H

/* out32: heartbeat counter, a few times a second. */
#define PORT_HEARTBEAT 0x510
/* in8: pending VMM command (CMD_*); 0 or 0xff means none. */
#define PORT_COMMAND 0x511
/* out32: result status (RESULT_*), written after its payload. */
#define PORT_RESULT 0x512
/* out32: result payload, low and high halves. */
#define PORT_RESULT_LO 0x513
#define PORT_RESULT_HI 0x514

#define CMD_NONE 0
#define CMD_VERIFY 1
/* This byte arriving on COM1 asks for a verify too: the way in for VMMs without our command
 * port (QEMU). The guest polls the UART once per heartbeat. */
#define SERIAL_CMD_VERIFY 'v'

/* payload: pages verified */
#define RESULT_VERIFY_OK 1
/* payload: first bad guest-physical address */
#define RESULT_VERIFY_BAD 2
/* payload: faulting rip */
#define RESULT_PANIC 3
/* payload: pages in the working set; sent once the workers run */
#define RESULT_READY 4
/* payload: disk writes acknowledged by the device so far; sent every heartbeat */
#define RESULT_DISK_ACKED 5
/* A disk check, sent before the memory verdict of the same verify: the counts of lost (reads
 * back as never written), stale (an older version) and torn (sectors of different versions or
 * corrupt) blocks, then the blocks checked, which completes it. */
#define RESULT_DISK_LOST 6
#define RESULT_DISK_STALE 7
#define RESULT_DISK_TORN 8
#define RESULT_DISK_CHECKED 9
/* payload: frames received and frames sent by the NIC (low and high 32 bits); every heartbeat */
#define RESULT_NET 10
/* payload: pages the workers have written so far (its write rate, as the guest sees it); every
 * heartbeat */
#define RESULT_MEM_WRITES 11

#endif
