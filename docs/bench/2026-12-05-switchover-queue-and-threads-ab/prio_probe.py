import socket, sys, time, threading, os, statistics
mode=sys.argv[1]
B='10.77.1.2'
if mode=='server':
    def sink(c):
        while c.recv(1<<20): pass
    def echo(c):
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY, int(sys.argv[2]))
        while True:
            d=c.recv(64)
            if not d: break
            c.sendall(d)
    ls=socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR,1); ls.bind((B,9001)); ls.listen(64)
    le=socket.socket(); le.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR,1); le.bind((B,9002)); le.listen(64)
    threading.Thread(target=lambda: [threading.Thread(target=sink,args=(ls.accept()[0],),daemon=True).start() for _ in iter(int,1)],daemon=True).start()
    while True:
        c,_=le.accept(); threading.Thread(target=echo,args=(c,),daemon=True).start()
else:
    nbulk=int(sys.argv[2])
    stop=False
    def bulk():
        s=socket.create_connection((B,9001)); buf=b'x'*(1<<20)
        while not stop: s.sendall(buf)
    ts=[threading.Thread(target=bulk,daemon=True) for _ in range(nbulk)]
    [t.start() for t in ts]
    time.sleep(2)
    for prio in (0,6,0,6):
        p=socket.create_connection((B,9002)); p.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY,1)
        p.setsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY, prio)
        rtts=[]
        for i in range(50):
            t=time.perf_counter(); p.sendall(b'p'*32); p.recv(64); rtts.append((time.perf_counter()-t)*1e3); time.sleep(0.02)
        rtts.sort()
        print('prio %d: median %.2f ms p90 %.2f max %.2f'%(prio, statistics.median(rtts), rtts[44], rtts[-1]))
        p.close()
    stop=True
