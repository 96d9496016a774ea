# An internal Network Load Balancer in the appliance subnets with one fixed private address per
# AZ (the browser VPC's DNS servers). Cross-zone load balancing is on so that source-IP stickiness
# holds whichever load balancer node a client reaches.
resource "aws_lb" "egressd" {
  #checkov:skip=CKV_AWS_91:NLB access logs record TLS listeners only; this NLB has TCP and TCP_UDP listeners, so there is nothing to log. egressd's audit log records every decision instead.
  name                             = var.name
  internal                         = true
  load_balancer_type               = "network"
  security_groups                  = [aws_security_group.nlb.id]
  enable_cross_zone_load_balancing = true
  enable_deletion_protection       = var.deletion_protection
  tags                             = local.tags

  dynamic "subnet_mapping" {
    for_each = aws_subnet.appliance
    content {
      subnet_id            = subnet_mapping.value.id
      private_ipv4_address = local.nlb_ips[subnet_mapping.key]
    }
  }
}

# Both target groups: source-IP stickiness (one client, one instance, so the per-client DNS
# tunneling budgets and upload budgets hold), client addresses preserved (egressd's `clients`
# rules and its audit log see the real client), health checks on /readyz on the admin port (a
# draining instance answers 503 and leaves the rotation before it stops).
resource "aws_lb_target_group" "proxy" {
  name_prefix            = "egprx-"
  port                   = 3128
  protocol               = "TCP"
  target_type            = "instance"
  vpc_id                 = aws_vpc.egress.id
  preserve_client_ip     = "true"
  deregistration_delay   = 60
  connection_termination = true
  tags                   = local.tags

  stickiness {
    enabled = true
    type    = "source_ip"
  }

  health_check {
    enabled             = true
    protocol            = "HTTP"
    port                = "9180"
    path                = "/readyz"
    matcher             = "200"
    interval            = 10
    timeout             = 5
    healthy_threshold   = 3
    unhealthy_threshold = 2
  }

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_lb_target_group" "dns" {
  name_prefix            = "egdns-"
  port                   = 53
  protocol               = "TCP_UDP"
  target_type            = "instance"
  vpc_id                 = aws_vpc.egress.id
  preserve_client_ip     = "true"
  deregistration_delay   = 30
  connection_termination = true
  tags                   = local.tags

  stickiness {
    enabled = true
    type    = "source_ip"
  }

  health_check {
    enabled             = true
    protocol            = "HTTP"
    port                = "9180"
    path                = "/readyz"
    matcher             = "200"
    interval            = 10
    timeout             = 5
    healthy_threshold   = 3
    unhealthy_threshold = 2
  }

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_lb_listener" "proxy" {
  load_balancer_arn = aws_lb.egressd.arn
  port              = 3128
  protocol          = "TCP"
  tags              = local.tags

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.proxy.arn
  }
}

resource "aws_lb_listener" "dns" {
  load_balancer_arn = aws_lb.egressd.arn
  port              = 53
  protocol          = "TCP_UDP"
  tags              = local.tags

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.dns.arn
  }
}
