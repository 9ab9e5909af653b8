// The list of VMs: rows re-rendered by the agent every 2 s.
import {get, poll, swap} from './common.js';

const body = document.getElementById('vms');
swap(body, body.innerHTML);
poll(async () => swap(body, (await get('/ui/api/vms')).html), 2000);
